"""shared/dkim.py: signatures verified by dkimpy's verifier against the generated record.

The public key reaches the verifier through its `dnsfunc` hook, parsed back from the
zone file line `keygen` prints: what an operator publishes is what is tested.
"""

from __future__ import annotations

import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from shared.config import ConfigError, DkimConfig, DkimKeyConfig, parse_config
from shared.dkim import (
    OVERSIGNED,
    DkimSigner,
    GeneratedKey,
    keygen,
    load_key,
    zone_record,
)
from shared.smtp import dot_unstuff, to_wire_data

BODY_8BIT = "Grüße, ça va? €100\r\n.leading dot line\r\n\r\n\r\n".encode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, GeneratedKey]:
    """One RSA and one Ed25519 key for example.com (RSA 1024 bits: fast, still accepted)."""
    folder = tmp_path_factory.mktemp("keys")
    return {"rsa": keygen("example.com", "rsa1", folder, "rsa", bits=1024),
            "ed25519": keygen("example.com", "ed1", folder, "ed25519")}


def published(record: str) -> tuple[str, bytes]:
    """(name, TXT value) from a zone line `name IN TXT "a" "b"`: strings are concatenated."""
    name, rest = record.split(" IN TXT ", 1)
    strings = re.findall(r'"([^"]*)"', rest)
    assert all(len(s) <= 255 for s in strings)
    return name, "".join(strings).encode()


def dns_for(*generated: GeneratedKey) -> Callable[..., bytes | None]:
    zone = dict(published(g.record) for g in generated)

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return zone.get(name.decode().rstrip("."))
    return dnsfunc


def signer_for(*generated: GeneratedKey, domain: str = "example.com") -> DkimSigner:
    return DkimSigner([load_key(domain, g.dns_name.split(".")[0], g.path) for g in generated])


def message(from_: bytes = b"Joe <joe@example.com>", body: bytes = BODY_8BIT,
            linesep: bytes = b"\r\n") -> bytes:
    data = (b"Received: from client by mx.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"From: " + from_ + b"\r\nTo: Ops <ops@example.org>,\r\n\tTeam <team@example.org>\r\n"
            b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from\r\n   a folded subject\r\n"
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body)
    return data.replace(b"\r\n", linesep)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_signature_verifies_8bit_crlf_folded(keys, algorithm: str) -> None:
    key = keys[algorithm]
    data = message()
    result = signer_for(key).sign(data)
    assert result.reason is None and result.domain == "example.com"
    assert result.data.endswith(data) and result.data.startswith(b"DKIM-Signature: ")
    assert dkim.verify(result.data, dnsfunc=dns_for(key))
    assert not dkim.verify(result.data.replace(b"100", b"900"), dnsfunc=dns_for(key))


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_signature_tags(keys, algorithm: str) -> None:
    result = signer_for(keys[algorithm]).sign(message())
    tags = dkim.util.parse_tag_value(
        result.data.split(b"\r\n\r\n")[0].split(b"DKIM-Signature:")[1].split(b"\r\nReceived")[0])
    assert tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"d"] == b"example.com"
    assert tags[b"a"] == {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}[algorithm]
    signed = [h.strip() for h in tags[b"h"].split(b":")]
    present = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
               b"content-type", b"content-transfer-encoding"]
    assert sorted(set(signed)) == sorted(present)  # Received: is not signed
    for name in present:  # oversigned: one more entry than fields present
        assert signed.count(name) == (2 if name.decode() in OVERSIGNED else 1)


def test_relayed_form_still_verifies(keys) -> None:
    """The relay receives the signed data dot-stuffed with CRLF: unstuffed, it verifies."""
    result = signer_for(keys["rsa"]).sign(message())
    wire = to_wire_data(result.data)
    received = dot_unstuff(wire[:-len(b".\r\n")])
    assert received == result.data
    assert dkim.verify(received, dnsfunc=dns_for(keys["rsa"]))


def test_lf_only_data_gets_an_lf_signature_that_verifies_as_crlf(keys) -> None:
    data = message(linesep=b"\n")
    result = signer_for(keys["rsa"]).sign(data)
    assert b"\r" not in result.data
    assert dkim.verify(result.data.replace(b"\n", b"\r\n"), dnsfunc=dns_for(keys["rsa"]))


def test_added_from_breaks_the_signature(keys) -> None:
    result = signer_for(keys["rsa"]).sign(message())
    tampered = result.data.replace(b"\r\nTo: ", b"\r\nFrom: evil@example.net\r\nTo: ", 1)
    assert not dkim.verify(tampered, dnsfunc=dns_for(keys["rsa"]))


def test_subdomain_from_is_signed_by_the_parent_key(keys) -> None:
    result = signer_for(keys["rsa"]).sign(message(b"news@News.Example.COM"))
    assert result.domain == "example.com"
    assert dkim.verify(result.data, dnsfunc=dns_for(keys["rsa"]))


def test_several_domains_choose_the_from_domain(tmp_path: Path, keys) -> None:
    other = keygen("example.org", "s2", tmp_path, "ed25519")
    signer = DkimSigner([load_key("example.com", "rsa1", keys["rsa"].path),
                         load_key("example.org", "s2", other.path)])
    result = signer.sign(message(b"a@example.org"))
    assert result.domain == "example.org"
    assert dkim.verify(result.data, dnsfunc=dns_for(other))


NOT_SIGNED = [
    ("no-key", b"x@example.net", "no DKIM key for example.net"),
    ("two-domains", b"a@example.com, b@example.net", "example.com, example.net"),
    ("unparseable", b"root", "From:"),
    ("similar-suffix-not-parent", b"x@badexample.com", "no DKIM key"),
]


@pytest.mark.parametrize(("from_", "reason"),
                         [pytest.param(f, r, id=i) for i, f, r in NOT_SIGNED])
def test_not_signed_with_the_reason(keys, from_: bytes, reason: str) -> None:
    data = message(from_)
    result = signer_for(keys["rsa"]).sign(data)
    assert result.data is data and result.domain is None
    assert reason in result.reason and "\n" not in result.reason


def test_no_from_header_is_not_signed(keys) -> None:
    data = b"Subject: x\r\n\r\nbody\r\n"
    result = signer_for(keys["rsa"]).sign(data)
    assert result.data is data and "no From:" in result.reason


def test_two_from_fields_in_different_domains_not_signed(keys) -> None:
    data = b"From: a@example.com\r\nFrom: b@example.net\r\n\r\nbody\r\n"
    assert "example.net" in signer_for(keys["rsa"]).sign(data).reason


def test_a_message_dkimpy_cannot_parse_is_relayed_unsigned(keys) -> None:
    data = b"From: a@example.com\r\n\x01bad header line\r\n\r\nbody\r\n"
    result = signer_for(keys["rsa"]).sign(data)
    assert result.data is data and result.reason.startswith("not signed")


def test_inactive_without_keys() -> None:
    signer = DkimSigner.from_config(DkimConfig())
    assert not signer.active
    assert signer.sign(message()).reason == "not signed: no DKIM key for example.com"


# ---------------------------------------------------------------------------- keygen


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_writes_0600_and_a_zone_record(tmp_path: Path, algorithm: str) -> None:
    generated = keygen("example.com", "mail", tmp_path / "new" / "keys", algorithm)
    assert generated.path == tmp_path / "new/keys/example.com.mail.pem"
    assert stat.S_IMODE(generated.path.stat().st_mode) == 0o600
    name, value = published(generated.record)
    assert name == "mail._domainkey.example.com"
    assert value.decode() == generated.dns_value
    assert value.startswith(f"v=DKIM1; k={algorithm}; p=".encode())
    assert load_key("example.com", "mail", generated.path).dns_value == generated.dns_value


def test_rsa_2048_record_is_split_into_255_character_strings(tmp_path: Path) -> None:
    generated = keygen("example.com", "s", tmp_path)
    strings = re.findall(r'"([^"]*)"', generated.record)
    assert len(strings) == 2 and len(strings[0]) == 255
    assert "".join(strings) == generated.dns_value
    result = signer_for(generated).sign(message())
    assert dkim.verify(result.data, dnsfunc=dns_for(generated))


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    first = keygen("example.com", "s", tmp_path, "ed25519")
    before = first.path.read_bytes()
    with pytest.raises(FileExistsError):
        keygen("example.com", "s", tmp_path, "ed25519")
    assert first.path.read_bytes() == before


@pytest.mark.parametrize(("algorithm", "bits"), [("dsa", 2048), ("rsa", 512)])
def test_keygen_refuses_bad_arguments(tmp_path: Path, algorithm: str, bits: int) -> None:
    with pytest.raises(ValueError):
        keygen("example.com", "s", tmp_path, algorithm, bits)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_zone_record_of_a_short_value() -> None:
    record = zone_record("s._domainkey.x.org", "v=DKIM1; p=")
    assert record == 's._domainkey.x.org IN TXT "v=DKIM1; p="'


# ---------------------------------------------------------------------------- key files


def test_openssl_made_keys_are_read(tmp_path: Path) -> None:
    """Keys made the usual ways: `openssl genrsa` (PKCS#1 or #8) and `genpkey ed25519`."""
    commands = {"rsa.pem": ["openssl", "genrsa", "-out", "rsa.pem", "1024"],
                "ed.pem": ["openssl", "genpkey", "-algorithm", "ed25519", "-out", "ed.pem"]}
    for name, command in commands.items():
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
        key = load_key("example.com", "s", tmp_path / name)
        generated = GeneratedKey(tmp_path / name, "s._domainkey.example.com", key.dns_value)
        result = DkimSigner([key]).sign(message())
        assert dkim.verify(result.data, dnsfunc=dns_for(generated)), name


def test_traditional_pkcs1_crlf_pem_is_read(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    path = tmp_path / "crlf.pem"
    path.write_bytes(pem.replace(b"\n", b"\r\n"))
    loaded = load_key("example.com", "s", path)
    generated = GeneratedKey(path, "s._domainkey.example.com", loaded.dns_value)
    assert dkim.verify(DkimSigner([loaded]).sign(message()).data, dnsfunc=dns_for(generated))


def _pem(key, password: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


BAD_KEYS = [
    ("missing", None, "cannot read it"),
    ("not-a-key", b"hello\n", "is not a PEM private key"),
    ("public-key-only", b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n",
     "is not a PEM private key"),
    ("passphrase", "passphrase", "has a passphrase"),
    ("ec-key", "ec", "DKIM signs with RSA or Ed25519"),
    ("rsa-512", "rsa512", "too short"),
]


@pytest.mark.parametrize(("content", "named"),
                         [pytest.param(c, n, id=i) for i, c, n in BAD_KEYS])
def test_bad_key_file_is_one_line_config_error(tmp_path: Path, content, named: str) -> None:
    path = tmp_path / "key.pem"
    if content == "passphrase":
        content = _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024), b"pw")
    elif content == "ec":
        content = _pem(ec.generate_private_key(ec.SECP256R1()))
    elif content == "rsa512":  # `cryptography` will not make one; openssl still does
        subprocess.run(["openssl", "genrsa", "-out", str(path), "512"], check=True,
                       capture_output=True)
        content = None
    if content is not None:
        path.write_bytes(content)
    config = DkimConfig(keys=(DkimKeyConfig("example.com", "s", path),))
    with pytest.raises(ConfigError) as failure:
        DkimSigner.from_config(config)
    message_text = str(failure.value)
    assert named in message_text and str(path) in message_text and "\n" not in message_text


def test_from_config_reads_every_key(tmp_path: Path, keys) -> None:
    other = keygen("example.org", "s2", tmp_path, "ed25519")
    config = parse_config({"dkim": {"domain": "example.com", "selector": "rsa1",
                                    "key_file": str(keys["rsa"].path),
                                    "keys": [{"domain": "example.org", "selector": "s2",
                                              "key_file": str(other.path)}]}},
                          tmp_path / "mailbag.toml")
    signer = DkimSigner.from_config(config.dkim)
    assert signer.active
    assert signer.sign(message(b"a@example.org")).domain == "example.org"
    assert signer.sign(message()).domain == "example.com"
