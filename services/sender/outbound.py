"""What a relayed message becomes on its way out: sender rewriting, then DKIM.

Applied per message when it is handed to a relay session, never to local delivery
(SPEC §8):
1. `[rewrite]`: the envelope sender, and the addresses of From:, Sender: and
   Reply-To: (rewrite.py). A field that cannot be parsed is relayed unchanged, and
   a warning with the message's id is logged.
2. `[dkim]`: a DKIM-Signature for the From: domain (shared/dkim.py), over exactly
   the bytes the relay gets: after rewriting, and after the 8-bit downgrade when the
   relay lacks 8BITMIME (the downgrade would break a signature made before it; the
   client session then finds the data 7 bit and leaves it). A message that is not
   signed for a reason worth knowing (From: in two domains, unparseable) is logged
   and relayed anyway.

With neither configured, `prepare` returns the queued sender and data untouched:
the relay hot path pays two attribute tests.
"""

from __future__ import annotations

from services.sender.downgrade import NotConvertible, for_relay
from services.sender.rewrite import SenderRewriter
from shared.dkim import NO_KEY, DkimSigner
from shared.log import EventLog


class Outbound:
    """What relayed mail gets on its way out, after it was read and before the relay
    session sees it: sender rewriting, then DKIM (which signs the final bytes)."""

    def __init__(self, rewriter: SenderRewriter, signer: DkimSigner) -> None:
        self.rewriter = rewriter
        self.signer = signer

    @property
    def active(self) -> bool:
        """False when neither is configured: the runner skips `prepare` altogether."""
        return self.rewriter.active or self.signer.active

    def prepare(self, queue_id: str, sender: str, data: bytes,
                relay_extensions: dict[str, str], log: EventLog) -> tuple[str, bytes]:
        """The envelope sender and the data to hand to the relay."""
        if self.rewriter.active:
            sender = self.rewriter.envelope(sender)
            result = self.rewriter.message(data)
            data = result.data
            for warning in result.warnings:
                log.info("rewrite", id=queue_id, warning=warning)
            if result.changed:
                log.ok("rewrite", id=queue_id, sender=f"<{sender}>",
                       fields=",".join(f"{name}:{new}" for name, _, new in result.changed))
        if self.signer.active:
            try:  # signed as sent: 7 bit for a relay without 8BITMIME
                data, _ = for_relay(data, "8BITMIME" in relay_extensions)
            except NotConvertible:
                return sender, data  # the session refuses it (5.6.3): nothing to sign
            signed = self.signer.sign(data)
            if signed.domain is not None:
                data = signed.data
                log.ok("dkim", id=queue_id, domain=signed.domain)
            elif signed.reason and not signed.reason.startswith(NO_KEY):
                log.info("dkim", id=queue_id, reason=signed.reason)
        return sender, data
