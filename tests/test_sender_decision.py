"""services/sender/decision.py: what becomes of a message after an attempt, from a table."""

from __future__ import annotations

import pytest

from services.sender.decision import (
    EXPIRED_STATUS,
    Action,
    Backoff,
    Outcome,
    RetryPolicy,
    Status,
    classify,
    decide,
)
from shared.queue import BLANK, DeliveryState
from shared.smtp import Reply

S, D, F, W = Status.SENT, Status.DEFERRED, Status.FAILED, Status.WAITING
ARRIVAL = 10_000.0
POLICY = RetryPolicy(Backoff(60, 3600), lifetime=1000.0, delay_warning=400.0)
RELAY_BACK = 10_100.0  # when the relay may be tried again (waiting_until)


def outcomes(*statuses: Status) -> list[Outcome]:
    return [Outcome(f"r{n}@example.org", status, f"{status.value} {n}", "relay")
            for n, status in enumerate(statuses)]


@pytest.mark.parametrize(
    ("statuses", "state", "at", "action", "remaining", "attempts", "next_attempt", "bounce",
     "warn"),
    [
        # all sent / all failed / a mix with nothing left
        ((S, S), BLANK, 10_050, Action.FINISH, 0, 0, 0.0, False, False),
        ((F,), BLANK, 10_050, Action.FAIL, 0, 0, 0.0, True, False),
        ((S, F), BLANK, 10_050, Action.FAIL, 0, 0, 0.0, True, False),
        # deferred: backoff from the time of the failure, attempts counted
        ((D,), BLANK, 10_050, Action.KEEP, 1, 1, 10_110.0, False, False),
        ((D,), DeliveryState(attempts=2), 10_050, Action.KEEP, 1, 3, 10_290.0, False, False),
        # some done, some left: rewrite
        ((S, D), BLANK, 10_050, Action.PARTIAL, 1, 1, 10_110.0, False, False),
        ((F, D), BLANK, 10_050, Action.PARTIAL, 1, 1, 10_110.0, True, False),
        # waiting (not attempted): no attempt counted, until the relay is back
        ((W, W), DeliveryState(attempts=1), 10_050, Action.KEEP, 2, 1, RELAY_BACK, False,
         False),
        ((S, W), BLANK, 10_050, Action.PARTIAL, 1, 0, RELAY_BACK, False, False),
        # a deferral and a wait: the deferral's backoff counts
        ((D, W), BLANK, 10_050, Action.KEEP, 2, 1, 10_110.0, False, False),
        # no retry scheduled past the delay-warning time while no warning was sent...
        ((D,), DeliveryState(attempts=6), 10_300, Action.KEEP, 1, 7, 10_400.0, False, False),
        # ... at it, one warning; then no retry past the expiry
        ((D,), DeliveryState(attempts=6), 10_400, Action.KEEP, 1, 7, 11_000.0, False, True),
        ((D,), DeliveryState(attempts=6, warned=True), 10_500, Action.KEEP, 1, 7, 11_000.0,
         False, False),
        # expired: what is left fails for good
        ((D,), DeliveryState(attempts=6, warned=True), 11_000, Action.FAIL, 0, 0, 0.0, True,
         False),
        ((S, W), BLANK, 11_001, Action.FAIL, 0, 0, 0.0, True, False),
    ],
)
def test_decide(statuses, state, at, action, remaining, attempts, next_attempt, bounce,
                warn) -> None:
    decision = decide(outcomes(*statuses), sender="alice@example.com", state=state, at=at,
                      arrival=ARRIVAL, policy=POLICY, waiting_until=RELAY_BACK)
    assert decision.action is action
    assert len(decision.remaining) == remaining
    assert decision.bounce is bounce and decision.warn is warn
    if remaining:
        assert decision.state.attempts == attempts
        assert decision.state.next_attempt == next_attempt
        assert decision.state.warned == (state.warned or warn)
    else:
        assert decision.state == BLANK


def test_the_null_sender_never_gets_a_notice() -> None:
    failed = decide(outcomes(F, D), sender="", state=BLANK, at=10_450, arrival=ARRIVAL,
                    policy=POLICY, waiting_until=RELAY_BACK)
    assert failed.failed and not failed.bounce and not failed.warn
    assert failed.state.next_attempt == 10_450 + 60  # no warning time to wake up for


def test_expiry_names_the_last_reply_and_status_4_4_7() -> None:
    decision = decide(outcomes(D), sender="a@b", state=BLANK, at=11_500, arrival=ARRIVAL,
                      policy=POLICY, waiting_until=RELAY_BACK)
    (failed,) = decision.failed
    assert decision.expired and failed.enhanced == EXPIRED_STATUS
    assert "expired after 1000s" in failed.detail and "deferred 0" in failed.detail


def test_an_operators_hold_is_kept() -> None:
    decision = decide(outcomes(D), sender="a@b", state=DeliveryState(held=True), at=10_050,
                      arrival=ARRIVAL, policy=POLICY, waiting_until=RELAY_BACK)
    assert decision.state.held and decision.state.attempts == 1


def test_the_last_reply_is_the_first_deferral_else_the_wait() -> None:
    decision = decide(outcomes(W, D), sender="a@b", state=BLANK, at=10_050,
                      arrival=ARRIVAL, policy=POLICY, waiting_until=RELAY_BACK)
    assert decision.state.last_reply == "deferred 1"


@pytest.mark.parametrize(("code", "status"), [(250, S), (251, S), (421, D), (452, D),
                                              (550, F), (554, F)])
def test_classify_by_the_code_alone(code: int, status: Status) -> None:
    assert classify(Reply(code, "whatever the text says")) is status


def test_backoff_doubles_up_to_the_maximum() -> None:
    backoff = Backoff(60, 3600)
    assert [backoff.delay(n) for n in range(1, 9)] == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff.delay(10_000) == 3600
