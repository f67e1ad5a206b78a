"""Sender rewriting for relayed mail (SPEC §8 `[rewrite]`, Postfix's smtp_generic_maps).

Smarthosts such as Gmail, Microsoft 365 or SES accept only senders they have
verified, so mail from `root@localhost` must leave as `alerts@example.com`. The
runner applies this module when it relays a message, never for local delivery.

- `envelope_sender`, when set, is the MAIL FROM of every relayed message.
- `senders` maps addresses: an exact address (`root@localhost`) wins over a domain
  (`@localhost`); a value `@example.com` keeps the local part, a full address
  replaces the whole address. Keys match without regard to case.
- The null sender `<>` (bounces) is never rewritten.
- In the data, the addresses of `From:`, `Sender:` and `Reply-To:` are mapped by
  `senders`. Only a field that holds an address to change is re-written, from the
  `email` package's parse of it: display names stay (RFC 2047 encoded when not
  ASCII), comments go. Every other byte of the message stays as it is.
- A field that cannot be parsed (`From: root`, not UTF-8, invalid syntax) is left as
  it is and reported in `warnings`; the runner logs it with the queue id and relays.

No I/O and no clock: the same input gives the same output.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.headerregistry import Address, Group

from shared.config import RewriteConfig
from shared.headers import format_address_field, parse_address_field, scan_headers
from shared.smtp import domain_of, local_part_of

REWRITTEN_FIELDS = ("from", "sender", "reply-to")


@dataclass(frozen=True)
class RewriteResult:
    """The data to relay and what changed in it."""

    data: bytes  # the input object itself when nothing changed
    changed: list[tuple[str, str, str]] = field(default_factory=list)  # (field, old, new)
    warnings: list[str] = field(default_factory=list)


class SenderRewriter:
    """The `[rewrite]` rules; `envelope` and `message` apply them."""

    def __init__(self, envelope_sender: str, senders: Mapping[str, str]) -> None:
        self.envelope_sender = envelope_sender
        self._exact = {k.lower(): v for k, v in senders.items() if not k.startswith("@")}
        self._domains = {k[1:].lower(): v for k, v in senders.items() if k.startswith("@")}

    @classmethod
    def from_config(cls, config: RewriteConfig) -> SenderRewriter:
        return cls(config.envelope_sender, config.senders)

    @property
    def active(self) -> bool:
        """False when there is nothing to rewrite (the runner can skip the data)."""
        return bool(self.envelope_sender or self._exact or self._domains)

    def address(self, address: str) -> str:
        """`address` mapped by `senders` (unchanged when no key matches)."""
        mapped = self._exact.get(address.lower())
        if mapped is None:
            mapped = self._domains.get(domain_of(address))
        if mapped is None or "@" not in address:
            return address
        if mapped.startswith("@"):
            return f"{local_part_of(address)}{mapped}"
        return mapped

    def envelope(self, sender: str) -> str:
        """The MAIL FROM for a relayed message whose envelope sender is `sender`."""
        if not sender:
            return sender  # <>: a bounce stays a bounce
        return self.envelope_sender or self.address(sender)

    def message(self, data: bytes) -> RewriteResult:
        """Rewrite the addresses of From:, Sender: and Reply-To: in `data`."""
        section = scan_headers(data)
        pieces: list[bytes] = []
        changed: list[tuple[str, str, str]] = []
        warnings: list[str] = []
        copied_to = 0
        for header in section.fields:
            if header.name.lower() not in REWRITTEN_FIELDS:
                continue
            parsed = parse_address_field(header.name, header.raw_value(data))
            if parsed.error:
                warnings.append(f"{parsed.error}: left unchanged")
                continue
            groups, field_changes = self._map_groups(parsed.groups)
            if not field_changes:
                continue
            pieces += [data[copied_to:header.start],
                       format_address_field(header.name, groups, section.eol)]
            copied_to = header.end
            changed += [(header.name, old, new) for old, new in field_changes]
        if not pieces:
            return RewriteResult(data, changed, warnings)
        pieces.append(data[copied_to:])
        return RewriteResult(b"".join(pieces), changed, warnings)

    def _map_groups(
        self, groups: tuple[Group, ...]
    ) -> tuple[tuple[Group, ...], list[tuple[str, str]]]:
        changes: list[tuple[str, str]] = []
        mapped_groups = []
        for group in groups:
            addresses = []
            for address in group.addresses:
                new = self.address(address.addr_spec)
                if new != address.addr_spec:
                    changes.append((address.addr_spec, new))
                    address = _with_addr_spec(address, new)
                addresses.append(address)
            mapped_groups.append(Group(group.display_name, addresses))
        return tuple(mapped_groups), changes


def _with_addr_spec(address: Address, addr_spec: str) -> Address:
    """`address` with another mailbox; built from parts, as Address(addr_spec=...)
    refuses a UTF-8 local part (RFC 6532 allows it)."""
    username, _, domain = addr_spec.rpartition("@")
    if len(username) >= 2 and username.startswith('"') and username.endswith('"'):
        username = re.sub(r"\\(.)", r"\1", username[1:-1])
    return Address(display_name=address.display_name, username=username, domain=domain)
