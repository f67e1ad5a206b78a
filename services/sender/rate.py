"""The outbound rate limit (`[sender] max_rate = "14/s"`): a token bucket.

The bucket holds at most `count` tokens and gains `count` per `seconds`; every
message handed to a relay takes one. A message that finds the bucket empty waits
for its token: it is not deferred and gets no backoff, and the queue keeps its
mtime order (the runner simply holds the next message back).

The limit holds across reconnects (the bucket belongs to the runner, not to a
session) and across restarts: the bucket's level is kept in `queue.dir/.rate`
(replaced atomically after each token; without fsync - a power cut may give back
the tokens of the last moments, never more than one bucket). A missing or
unreadable file starts the bucket empty, the safe side of a provider's quota.

Pure arithmetic but for `load`/`save`; time is passed in.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from shared.config import Rate
from shared.queue.files import unlink_quietly, write_durably

RATE_FILE = ".rate"


class TokenBucket:
    def __init__(self, rate: Rate, tokens: float = 0.0, at: float = 0.0) -> None:
        self.rate = rate
        self.tokens = min(float(tokens), rate.count)
        self.at = at  # when `tokens` was counted

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.rate.count,
                              self.tokens + (now - self.at) * self.rate.count / self.rate.seconds)
        self.at = now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: take one now). A token short by a
        rounding error counts as there: the wait for it would not move the clock."""
        self._refill(now)
        if self.tokens >= 1.0 - 1e-9:
            return 0.0
        return (1.0 - self.tokens) * self.rate.seconds / self.rate.count

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0

    # -- kept across restarts ---------------------------------------------------------

    @classmethod
    def load(cls, rate: Rate, queue_dir: Path, now: float) -> TokenBucket:
        """The bucket as the last run left it (empty if unknown: never above the limit)."""
        try:
            saved = json.loads((Path(queue_dir) / RATE_FILE).read_bytes())
            tokens, at = float(saved["tokens"]), float(saved["at"])
        except (OSError, ValueError, KeyError, TypeError):
            return cls(rate, 0.0, now)
        if at > now or not (math.isfinite(tokens) and math.isfinite(at)):
            return cls(rate, 0.0, now)  # the clock went back, or a damaged file: trust nothing
        return cls(rate, tokens, at)

    def save(self, queue_dir: Path) -> None:
        path = Path(queue_dir) / RATE_FILE
        tmp = path.with_name(f"{RATE_FILE}.{os.getpid()}")
        unlink_quietly(tmp)  # a leftover of a crashed run with the same pid
        try:
            write_durably(tmp, (json.dumps({"tokens": self.tokens, "at": self.at}).encode(),),
                          sync=False)
            os.rename(tmp, path)
        except OSError:
            unlink_quietly(tmp)  # the limit still holds in memory
