"""`make install-sendmail`: make `mailbag-sendmail` the machine's sendmail and mailq.

Creates two symlinks to the venv's `mailbag-sendmail` (which picks its mode from
the name it is called by):

    ROOT/PREFIX/sbin/sendmail   what cron, PHP, git send-email and mutt call
    ROOT/PREFIX/bin/mailq       the queue listing (= sendmail -bp)

ROOT is make's DESTDIR (empty: the real system), PREFIX defaults to /usr. An entry
that already leads to mailbag-sendmail is left alone (running it twice is fine).
Anything else there - another MTA's binary, such as Postfix's /usr/sbin/sendmail -
is refused unless --force (make's FORCE=1); then it is renamed to
`<name>.before-mailbag` (never deleted), so `mv` puts it back.

Exit status 0 when both links are in place, 1 (one line per problem) otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

KEPT_SUFFIX = ".before-mailbag"
LINKS = ("sbin/sendmail", "bin/mailq")


class InstallError(Exception):
    """One line for the operator."""


def install_link(link: Path, target: Path, *, force: bool) -> str:
    """Make `link` a symlink to `target`; what was done, as one line."""
    if os.path.lexists(link):
        if link.resolve() == target.resolve():
            return f"{link}: already mailbag-sendmail"
        what = f"a symlink to {os.readlink(link)}" if link.is_symlink() else "a file"
        if not force:
            raise InstallError(f"{link} is {what}, another MTA's: not replaced "
                               f"(FORCE=1 replaces it and keeps it as {link.name}{KEPT_SUFFIX})")
        kept = link.with_name(link.name + KEPT_SUFFIX)
        if os.path.lexists(kept):
            raise InstallError(f"{kept} exists already: move it away first")
        os.rename(link, kept)
        os.symlink(target, link)
        return f"{link} -> {target} (was {what}, kept as {kept.name})"
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    return f"{link} -> {target}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, type=Path,
                        help="the mailbag-sendmail script the links point to")
    parser.add_argument("--root", default="", help="DESTDIR: install under this folder")
    parser.add_argument("--prefix", default="/usr", help="PREFIX (default /usr)")
    parser.add_argument("--force", action="store_true", help="replace another MTA's files")
    args = parser.parse_args(argv)
    target = args.target.absolute()
    if not os.access(target, os.X_OK):
        print(f"install-sendmail: {target} is not an executable (make venv first)",
              file=sys.stderr)
        return 1
    base = Path(args.root + "/" + args.prefix.strip("/")) if args.root else Path(args.prefix)
    status = 0
    for relative in LINKS:
        try:
            print(install_link(base / relative, target, force=args.force))
        except (InstallError, OSError) as err:
            print(f"install-sendmail: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
