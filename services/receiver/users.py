"""The receiver's AUTH users: a file of `name:scrypt$N$r$p$salt$hash` lines.

Passwords are never stored; scrypt (RFC 7914) makes each guess expensive. The file is
read once at start; an unreadable or malformed file stops the receiver with one line.

Add a user: `.venv/bin/python -m services.receiver.users FILE NAME` (password read
from standard input, or asked for on a terminal).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import secrets
import sys
from pathlib import Path

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class UserFileError(Exception):
    """The users file cannot be used; str() is one line."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(users: dict[str, str], username: str, password: str) -> bool:
    stored = users.get(username)
    if stored is None:
        hash_password(password)  # same cost for unknown users: no timing oracle
        return False
    _, n, r, p, salt, digest = stored.split("$")
    computed = hashlib.scrypt(
        password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p)
    )
    return hmac.compare_digest(computed, base64.b64decode(digest))


def load_users(path: Path) -> dict[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserFileError(f"cannot read users file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UserFileError(f"users file {path}: not UTF-8 (byte {err.start})") from None
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not name or not _well_formed(stored):
            raise UserFileError(
                f"users file {path}, line {number}: expected name:scrypt$N$r$p$salt$hash"
            )
        users[name] = stored
    return users


def _well_formed(stored: str) -> bool:
    """Checked at start, so that a bad line is a start-up error, not a crash at AUTH."""
    fields = stored.split("$")
    if len(fields) != 6 or fields[0] != "scrypt":
        return False
    try:
        n, r, p = (int(value) for value in fields[1:4])
        base64.b64decode(fields[4], validate=True)
        base64.b64decode(fields[5], validate=True)
    except ValueError:  # binascii.Error is a ValueError
        return False
    # hashlib.scrypt refuses more than 32 MiB (OpenSSL's default maxmem).
    fits = 128 * r * (n + 2 + p) <= 32 * 1024 * 1024
    return n > 1 and n & (n - 1) == 0 and r > 0 and p > 0 and fits


def add_user(path: Path, username: str, password: str) -> None:
    """Add or replace a user, writing the file atomically with mode 0600."""
    if not username or ":" in username or any(c.isspace() for c in username):
        raise UserFileError(f"bad user name {username!r}")
    users = load_users(path) if Path(path).exists() else {}
    users[username] = hash_password(password)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.writelines(f"{name}:{stored}\n" for name, stored in sorted(users.items()))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m services.receiver.users USERS_FILE USERNAME", file=sys.stderr)
        sys.exit(2)
    path, username = Path(args[0]), args[1]
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {username}: ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("users: error: empty password", file=sys.stderr)
        sys.exit(2)
    try:
        add_user(path, username, password)
    except UserFileError as err:
        print(f"users: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"user {username} saved in {path}")


if __name__ == "__main__":
    main()
