"""Where each recipient of a message goes (SPEC §4, §8): aliases, then Maildir or relay.

`Router.route` expands the queued recipients through the alias table (at delivery
time, so a reload takes effect for mail already queued), delivers every local
target to its Maildir at once, and returns the relayed targets for the relay
session. One log line per recipient that an alias changed, naming the alias.

- A recipient whose alias loops fails for good (5.3.5, system incorrectly
  configured): it is bounced, never retried forever.
- A notice (null sender) to a local mailbox that cannot exist - a local part that
  is no mailbox name, refused with 550 - goes to `postmaster` instead (SPEC §8):
  a bounce must reach somebody, and a bounce of a bounce is never sent.
- Messages with no local recipient skip all of this: the relay hot path pays one
  `is_local` test per recipient.
- A message rewritten after a partial delivery holds alias targets already
  (`expanded`, from its delivery state): each goes where it is written, never
  through the aliases again (a target that names its own alias would expand to
  every target once more, and the catch-all would catch a mailbox target).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.sender.decision import Outcome, Status
from services.sender.local import LocalDelivery, is_local
from shared.aliases import POSTMASTER, AliasTable, Expansion
from shared.log import EventLog
from shared.queue import QueueFile

ALIAS_ERROR_STATUS = "5.3.5"  # RFC 3463: system incorrectly configured


@dataclass
class Routes:
    """One message's recipients, sorted out."""

    local: list[Outcome] = field(default_factory=list)  # delivered (or refused) already
    remote: tuple[str, ...] = ()  # for the relay
    origins: dict[str, str] = field(default_factory=dict)  # target -> recipient as queued
    expanded: bool = False  # the recipients went through the aliases


class Router:
    """Where each recipient of a message goes: through the aliases, to a Maildir
    (delivered here, at once), or to the relay. Used at delivery, not at receipt, so
    that a reloaded alias table applies to mail already queued."""

    def __init__(self, aliases: AliasTable, local: LocalDelivery,
                 local_domains: frozenset[str], log: EventLog) -> None:
        self.aliases = aliases
        self.local = local
        self.local_domains = local_domains
        self.log = log.with_peer("local")

    def route(self, queue_id: str, message: QueueFile, *, expanded: bool = False) -> Routes:
        """Deliver the local recipients, return the others; `expanded`: the queued
        recipients are alias targets already."""
        recipients = message.recipients
        if not self.local_domains or not any(is_local(r, self.local_domains)
                                             for r in recipients):
            return Routes(remote=recipients)
        routes = Routes(expanded=True)
        remote: list[str] = []
        expansions = ([Expansion(r, r, None) for r in recipients] if expanded
                      else self.aliases.expand(recipients))
        for expansion in expansions:
            if expansion.via is not None:
                self.log.info("alias", id=queue_id, to=f"<{expansion.original}>",
                              alias=expansion.via,
                              target=f"<{expansion.target}>" if expansion.target else "-",
                              **({"error": expansion.error} if expansion.error else {}))
            if expansion.target is None:
                routes.local.append(Outcome(expansion.original, Status.FAILED,
                                            expansion.error or "alias error", "local",
                                            ALIAS_ERROR_STATUS))
                continue
            target = expansion.target
            if expansion.via is not None:
                routes.origins[target] = expansion.original
            if not is_local(target, self.local_domains):
                remote.append(target)
                continue
            outcome = self._deliver(message, target)
            if outcome.status is Status.FAILED and message.sender == "" \
                    and expansion.via != POSTMASTER:
                self._to_postmaster(queue_id, message, target, routes, remote)
                continue
            routes.local.append(outcome)
        routes.remote = tuple(remote)
        return routes

    def _deliver(self, message: QueueFile, target: str) -> Outcome:
        reply = self.local.deliver(message.sender, target, message.data)
        return Outcome.of_reply(target, reply, "local")

    def _to_postmaster(self, queue_id: str, message: QueueFile, target: str,
                       routes: Routes, remote: list[str]) -> None:
        """A notice whose local recipient cannot be delivered goes to postmaster."""
        self.log.info("alias", id=queue_id, to=f"<{target}>", alias=POSTMASTER,
                      reason="a notice for a mailbox that cannot exist")
        for expansion in self.aliases.expand([POSTMASTER]):
            if expansion.target is None:
                routes.local.append(Outcome(target, Status.FAILED, expansion.error or "",
                                            "local", ALIAS_ERROR_STATUS))
            elif is_local(expansion.target, self.local_domains):
                routes.local.append(self._deliver(message, expansion.target))
            else:
                remote.append(expansion.target)
