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

Both links or none: if either is refused, nothing is changed (an error while
making them - a read-only /usr - is reported, and what was made stays). Exit
status 0 when both links are in place, 1 (one line per problem) otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

KEPT_SUFFIX = ".before-mailbag"
LINKS = ("sbin/sendmail", "bin/mailq")


def refusal(link: Path, target: Path, *, force: bool) -> str | None:
    """Why `link` must not be replaced, or None if it may (absent, ours, or forced)."""
    if not os.path.lexists(link) or link.resolve() == target.resolve():
        return None
    what = f"a symlink to {os.readlink(link)}" if link.is_symlink() else "a file"
    if not force:
        return (f"{link} is {what}, another MTA's: not replaced "
                f"(FORCE=1 replaces it and keeps it as {link.name}{KEPT_SUFFIX})")
    kept = link.with_name(link.name + KEPT_SUFFIX)
    if os.path.lexists(kept):
        return f"{kept} exists already: move it away first"
    return None


def install_link(link: Path, target: Path) -> str:
    """Make `link` a symlink to `target` (refusal() said it may); what was done."""
    if os.path.lexists(link):
        if link.resolve() == target.resolve():
            return f"{link}: already mailbag-sendmail"
        what = f"a symlink to {os.readlink(link)}" if link.is_symlink() else "a file"
        kept = link.with_name(link.name + KEPT_SUFFIX)
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
    links = [base / relative for relative in LINKS]
    # Both refused or neither: a machine with mailq from mailbag and sendmail from
    # another MTA would list one queue and fill another.
    refused = [why for why in (refusal(link, target, force=args.force) for link in links) if why]
    for why in refused:
        print(f"install-sendmail: {why}; nothing installed", file=sys.stderr)
    if refused:
        return 1
    status = 0
    for link in links:
        try:
            print(install_link(link, target))
        except OSError as err:
            print(f"install-sendmail: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
