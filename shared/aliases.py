"""Aliases (SPEC §8, `[aliases]`): which mailboxes and addresses a local recipient means.

The table maps local parts (case-insensitive) to one target or a list of targets; it
applies to every domain of `[local] domains`. The sender expands recipients at
delivery time, so a reload takes effect for mail already queued. No I/O here.

How a recipient resolves (`AliasTable.expand`):

- A recipient outside the local domains is relayed as it is.
- A local recipient (`name@<local domain>`, or a bare `name` such as `postmaster`)
  whose name is an alias key expands to the alias's targets, recursively:
  - a target without `@` is a local name: another alias, or else the mailbox
    `<name>@<first local domain>`;
  - a target `name@<local domain>` resolves by its name the same way, but stays
    written as it is when it ends in a mailbox;
  - a target in any other domain is final: that copy is relayed;
  - a target naming the alias itself (`root = ["root", "ops@example.org"]`) means the
    mailbox of that name as well, as in Postfix: it is not expanded again.
- `"*"` is the catch-all of the local domains. It applies only to a recipient AS
  QUEUED whose name is not an alias key, never to a name reached through an alias:
  an alias target names a mailbox on purpose, and `"*" = "admin"` (admin no alias)
  is the mailbox admin, not the catch-all again. So the catch-all cannot loop.
- A local recipient that is neither an alias nor caught is its own mailbox.
- `postmaster` is `root` unless the table names it (RFC 5321 §4.5.1 requires a
  postmaster; the receiver accepts a bare `RCPT TO:<postmaster>`).

Expansion is de-duplicated across all the recipients of one message (by mailbox for
local targets, whatever domain they are written in, and by address for relayed
ones): `root -> admin`, `admin -> admin@example.com` with both `root@localhost` and
`admin@localhost` queued gives one copy. The first recipient that reaches a target
keeps it.

Errors: `AliasTable.from_config` raises `AliasError` (one line naming the alias) for
an alias that expands to nothing, a target that is not an address, a loop or a chain
deeper than `MAX_DEPTH`; the config refuses to load with it. `expand` never raises:
with a table built without that check, a loop comes back as an `Expansion` with
`error` set, which the runner fails with a bounce instead of spinning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shared.smtp import PathSyntaxError, check_mailbox, domain_of, local_part_of

CATCH_ALL = "*"
POSTMASTER = "postmaster"
DEFAULT_POSTMASTER_TARGET = "root"
MAX_DEPTH = 20  # alias -> alias -> ... steps: beyond it a table is certainly a mistake


class AliasError(ValueError):
    """A table that cannot be used; str() is one line naming the alias."""


@dataclass(frozen=True)
class Expansion:
    """What one queued recipient became: a `target` to deliver to, or an `error`."""

    original: str  # the recipient as queued
    target: str | None  # the final address (a local mailbox or a relayed address)
    via: str | None  # the alias key that applied to `original` (None: no alias)
    error: str | None = None  # e.g. "alias loop: a -> b -> a"


class _Walk:
    """One `expand` call: the targets found so far and the aliases already expanded."""

    def __init__(self) -> None:
        self.seen_targets: set[str] = set()
        self.expanded: set[str] = set()
        self.results: list[Expansion] = []


class AliasTable:
    """An alias table for a set of local domains; `expand` resolves recipients."""

    def __init__(self, table: Mapping[str, str | Sequence[str]],
                 local_domains: Sequence[str]) -> None:
        """Build without checking for loops or empty aliases (`from_config` checks)."""
        self.local_domains = tuple(d.lower() for d in local_domains)
        self._domains = frozenset(self.local_domains)
        self._table: dict[str, tuple[str, ...]] = {POSTMASTER: (DEFAULT_POSTMASTER_TARGET,)}
        self._twice: list[str] = []  # keys that differ from an earlier one only by case
        given: set[str] = set()
        for key, targets in table.items():
            if key.lower() in given:
                self._twice.append(key)
            given.add(key.lower())
            listed = (targets,) if isinstance(targets, str) else tuple(targets)
            self._table[key.lower()] = tuple(t.strip() for t in listed if t.strip())

    @classmethod
    def from_config(cls, table: Mapping[str, str | Sequence[str]],
                    local_domains: Sequence[str]) -> AliasTable:
        """Build and check the table; AliasError names the first alias that is wrong."""
        aliases = cls(table, local_domains)
        aliases.check()
        return aliases

    def check(self) -> None:
        """Raise AliasError for an empty alias, a malformed key or target, a loop or a
        chain deeper than MAX_DEPTH."""
        if self._twice:
            raise AliasError(f"alias {self._twice[0]!r} is given twice (keys ignore case)")
        for key, targets in self._table.items():
            if key != CATCH_ALL and (not key or "@" in key or any(c.isspace() for c in key)):
                raise AliasError(f"alias {key!r}: a key is a local part, without @ or spaces")
            if not targets:
                raise AliasError(f"alias {key!r} expands to nothing")
            for target in targets:
                _check_target(key, target)
        for key in self._table:
            for result in self._resolve_alias(key):
                if result.error:
                    raise AliasError(result.error)

    def expand(self, recipients: Iterable[str]) -> list[Expansion]:
        """Resolve every recipient; de-duplicated by target, in recipient order.

        Never raises: a recipient whose expansion loops or runs too deep comes back
        with `error` set (and `target` None), next to any targets it did reach.
        """
        walk = _Walk()
        for recipient in recipients:
            name = self._local_name(recipient)
            if name is None:
                self._emit(walk, Expansion(recipient, recipient, None))
            elif name in self._table:
                self._walk_alias(walk, recipient, name, name, [name])
            elif name != CATCH_ALL and CATCH_ALL in self._table:
                self._walk_alias(walk, recipient, CATCH_ALL, CATCH_ALL, [CATCH_ALL])
            else:
                target = recipient if "@" in recipient else self._mailbox(name)
                self._emit(walk, Expansion(recipient, target, None))
        return walk.results

    # ------------------------------------------------------------------ internals

    def _resolve_alias(self, key: str) -> list[Expansion]:
        walk = _Walk()
        self._walk_alias(walk, key, key, key, [key])
        return walk.results

    def _walk_alias(self, walk: _Walk, original: str, via: str, key: str,
                    path: list[str]) -> None:
        """Depth-first over `key`'s targets; `path` is the chain of aliases to here."""
        if key in walk.expanded:
            return  # reached before by another branch or recipient: its targets are in
        walk.expanded.add(key)
        for target in self._table[key]:
            name = self._local_name(target)
            if name is None:
                self._emit(walk, Expansion(original, target, via))
            elif name == key or name not in self._table:
                mailbox = target if "@" in target else self._mailbox(name)
                self._emit(walk, Expansion(original, mailbox, via))
            elif name in path:
                chain = " -> ".join([*path, name])
                self._emit(walk, Expansion(original, None, via, f"alias loop: {chain}"))
            elif len(path) >= MAX_DEPTH:
                chain = " -> ".join([*path, name])
                self._emit(walk, Expansion(original, None, via,
                                           f"alias chain deeper than {MAX_DEPTH}: {chain}"))
            else:
                self._walk_alias(walk, original, via, name, [*path, name])

    def _emit(self, walk: _Walk, expansion: Expansion) -> None:
        if expansion.target is not None:
            key = self._dedup_key(expansion.target)
            if key in walk.seen_targets:
                return
            walk.seen_targets.add(key)
        walk.results.append(expansion)

    def _local_name(self, address: str) -> str | None:
        """The lower-cased name if `address` is local (bare or in a local domain)."""
        if "@" not in address:
            return address.lower()
        if domain_of(address) in self._domains:
            return local_part_of(address).lower()
        return None

    def _mailbox(self, name: str) -> str:
        return f"{name}@{self.local_domains[0]}" if self.local_domains else name

    def _dedup_key(self, target: str) -> str:
        """Local mailboxes are one folder per name; relayed addresses by domain case."""
        name = self._local_name(target)
        if name is not None:
            return f"local:{name}"
        return f"{local_part_of(target)}@{domain_of(target)}"


def _check_target(key: str, target: str) -> None:
    if target == CATCH_ALL:
        raise AliasError(f"alias {key!r}: {CATCH_ALL!r} is not a target")
    if any(c.isspace() for c in target) or "<" in target or ">" in target:
        raise AliasError(f"alias {key!r}: {target!r} is not an address or a local name")
    if "@" in target:
        try:
            check_mailbox(target)
        except PathSyntaxError as err:
            raise AliasError(f"alias {key!r}: {target!r}: {err}") from None
