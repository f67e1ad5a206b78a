"""DKIM signing of relayed mail (RFC 6376) and DKIM key generation.

The signatures are made by dkimpy, the keys are read and made by `cryptography`: no
crypto of our own. The sender signs at relay time, after sender rewriting, so what
it signs is exactly what the relay receives; `mailbag dkim-keygen` and
`mailbag check` use `keygen` and `DkimSigner.from_config` from here.

Signing (`DkimSigner.sign`):
- the key is chosen by the domain of the `From:` address: the key of that domain,
  else of its nearest parent domain (`news.example.com` is signed as `example.com`,
  which DMARC's relaxed alignment accepts);
- no signature, with the reason, when there is no `From:`, when it cannot be parsed,
  when its addresses are in different domains (signing for one of them would claim
  the others), when no key matches, or when dkimpy refuses the message; the runner
  logs the reason and relays the message unsigned;
- relaxed/relaxed canonicalisation (RFC 6376 §3.4), which survives the re-folding
  and white space changes relays make;
- signed: every header field of `SIGNED_FIELDS` (RFC 6376 §5.4.1's list) present in
  the message; the fields of `OVERSIGNED` that are present are listed once more, so a
  second `From:` or `Subject:` added on the way breaks the signature (§8.15);
- CRLF data gets a CRLF DKIM-Signature field, LF-only data an LF one: the relay
  client turns both into the same CRLF lines, which is what the signature covers.

Keys: PEM, RSA (at least 1024 bits, 2048 recommended by RFC 8301) or Ed25519 (RFC
8463), PKCS#1 or PKCS#8, without a passphrase. `DkimSigner.from_config` reads them
once, when the sender starts or reloads, and raises ConfigError naming the file.

dkimpy puts the current time in the signature's `t=` tag; nothing else here depends
on a clock.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from shared.config import ConfigError, DkimConfig
from shared.headers import parse_address_field, scan_headers

# dkimpy and cryptography are imported where keys are read or mail is signed: a
# sender without a DKIM key never pays for them at start (a seventh of a second).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

# RFC 6376 §5.4.1: the fields a signature should cover (when present).
SIGNED_FIELDS = (
    "from", "reply-to", "subject", "date", "to", "cc", "resent-date", "resent-from",
    "resent-to", "resent-cc", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
    "sender", "message-id", "mime-version", "content-type", "content-transfer-encoding",
    "content-id", "content-description", "resent-sender", "resent-message-id",
)
# RFC 5322 §3.6's fields that occur at most once, and Subject: adding another breaks it.
OVERSIGNED = ("from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
              "in-reply-to", "references")
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: verifiers must refuse smaller keys
# RFC 8301 §3.2: verifiers must handle keys up to 4096 bits, larger ones need not
# verify; generating one takes minutes to hours (keygen refuses them).
MAX_RSA_BITS = 4096
TXT_STRING_MAX = 255  # RFC 1035 §3.3.14: one <character-string> in a TXT record
# The reason for mail of a domain with no key: the usual case, which callers need
# not log (only other reasons mean that something is wrong).
NO_KEY = "not signed: no DKIM key for"

Algorithm = Literal["rsa", "ed25519"]


@dataclass(frozen=True)
class SigningKey:
    """A key ready for dkimpy, and the DNS TXT value a verifier must find."""

    domain: str
    selector: str
    path: Path
    algorithm: bytes  # dkimpy's a= value: b"rsa-sha256" or b"ed25519-sha256"
    private: bytes  # PEM (RSA) or base64 seed (Ed25519): the forms dkimpy reads
    dns_value: str  # "v=DKIM1; k=rsa; p=..."

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True)
class SignResult:
    """`data` signed for `domain`, or `data` unchanged and the `reason` why not."""

    data: bytes
    domain: str | None = None
    reason: str | None = None


class DkimSigner:
    """Signs messages with the key of their From: domain."""

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        self._keys = {key.domain.lower(): key for key in keys}

    @classmethod
    def from_config(cls, config: DkimConfig) -> DkimSigner:
        """Read every configured key; ConfigError (one line, naming the file) if one is bad."""
        return cls([load_key(k.domain, k.selector, k.key_file)
                    for k in config.all_keys if k.key_file is not None])

    @property
    def active(self) -> bool:
        """False when no key is configured (the runner need not call `sign`)."""
        return bool(self._keys)

    def key_for(self, domain: str) -> SigningKey | None:
        """The key of `domain` or of its nearest parent domain."""
        labels = domain.lower().rstrip(".").split(".")
        for start in range(len(labels) - 1):
            key = self._keys.get(".".join(labels[start:]))
            if key is not None:
                return key
        return None

    def sign(self, data: bytes) -> SignResult:
        """Prepend a DKIM-Signature for the From: domain, or say why there is none."""
        section = scan_headers(data)
        domains: set[str] = set()
        for header in section.named("from"):
            parsed = parse_address_field(header.name, header.raw_value(data))
            if parsed.error:
                return SignResult(data, reason=f"not signed: {parsed.error}")
            domains.update(_ascii_domain(a.domain) for a in parsed.addresses)
        if not domains:
            return SignResult(data, reason="not signed: no From: address")
        if len(domains) > 1:
            names = ", ".join(sorted(domains))
            return SignResult(data, reason=f"not signed: From: has addresses in {names}")
        domain = domains.pop()
        key = self.key_for(domain)
        if key is None:
            return SignResult(data, reason=f"{NO_KEY} {domain}")
        present = [f.name.lower() for f in section.fields]
        fields = [name for name in present if name in SIGNED_FIELDS]
        fields += [name for name in OVERSIGNED if name in present]
        import dkim

        try:
            signer = dkim.DKIM(data, signature_algorithm=key.algorithm, linesep=section.eol)
            signature = signer.sign(
                key.selector.encode(), key.domain.encode(), key.private,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[name.encode() for name in fields],
            )
        except dkim.DKIMException as err:
            return SignResult(data, reason=f"not signed: {err}")
        return SignResult(signature + data, domain=key.domain)


def _ascii_domain(domain: str) -> str:
    """The domain as DNS has it: lower case, IDNA A-labels (the d= of a signature)."""
    lowered = domain.lower().rstrip(".")
    if lowered.isascii():
        return lowered
    try:
        return lowered.encode("idna").decode("ascii")
    except UnicodeError:
        return lowered  # matches no configured (ASCII) domain: not signed


# ---------------------------------------------------------------------------- keys


def load_key(domain: str, selector: str, path: Path) -> SigningKey:
    """Read a PEM private key for signing; ConfigError (one line naming `path`) if bad."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    try:
        pem = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"dkim key_file {path}: cannot read it: {err.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(f"dkim key_file {path}: has a passphrase; "
                          "mailbag needs the key without one") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"dkim key_file {path}: is not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"dkim key_file {path}: an RSA key of {key.key_size} bits is too "
                              f"short (verifiers refuse under {MIN_RSA_BITS})")
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        return SigningKey(domain, selector, Path(path), b"rsa-sha256", private,
                          dns_value(key))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return SigningKey(domain, selector, Path(path), b"ed25519-sha256",
                          base64.b64encode(seed), dns_value(key))
    raise ConfigError(f"dkim key_file {path}: is a {type(key).__name__} key; "
                      "DKIM signs with RSA or Ed25519")


def dns_value(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """The TXT value publishing `key`'s public half (RFC 6376 §3.6.1, RFC 8463 §4.2)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


def zone_record(name: str, value: str) -> str:
    """`name IN TXT "..." "..."`: the value split into strings DNS can hold (255 each)."""
    chunks = [value[i:i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]
    return f"{name} IN TXT " + " ".join(f'"{chunk}"' for chunk in chunks)


@dataclass(frozen=True)
class GeneratedKey:
    """A new key on disk and what to publish for it."""

    path: Path  # the private key, mode 0600
    dns_name: str  # selector._domainkey.domain
    dns_value: str  # v=DKIM1; k=...; p=...

    @property
    def record(self) -> str:
        """The zone file line to publish."""
        return zone_record(self.dns_name, self.dns_value)


def keygen(domain: str, selector: str, folder: Path, algorithm: Algorithm = "rsa",
           bits: int = 2048) -> GeneratedKey:
    """Write a new private key to `folder/<domain>.<selector>.pem` (mode 0600).

    Never overwrites: an existing file raises FileExistsError (a key in use must not
    be replaced by accident). ValueError for an unknown algorithm, or bits out of
    RSA's range for DKIM; OSError if the folder or the file cannot be written.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == "rsa":
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise ValueError(f"an RSA key for DKIM has {MIN_RSA_BITS} to {MAX_RSA_BITS} bits "
                             f"(RFC 8301), not {bits}")
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = rsa.generate_private_key(
            public_exponent=65537, key_size=bits)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown key algorithm {algorithm!r}: rsa or ed25519")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{domain}.{selector}.pem"
    _write_private(path, pem)
    return GeneratedKey(path, f"{selector}._domainkey.{domain}", dns_value(key))


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` readable by its owner only, durably; nothing left if it fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    folder_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)
