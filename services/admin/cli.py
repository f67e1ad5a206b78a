"""`mailbag`: the administrator's command (SPEC §7), the vocabulary of Postfix's
postqueue / postsuper / `postfix check`.

    mailbag [--config FILE] queue [--failed] [--json]
    mailbag show ID [--body]
    mailbag flush [ID...]
    mailbag hold ID...            mailbag release ID...
    mailbag delete ID... | --all | --failed [ID...]
    mailbag requeue ID...
    mailbag check
    mailbag status [--supervisord-conf FILE]
    mailbag dkim-keygen DOMAIN SELECTOR [--dir FOLDER] [--ed25519] [--bits N]

The config is found like the programs find it (`--config` > `MAILBAG_CONFIG` >
the repository's mailbag.toml), so it works from cron or any folder; `--config`
may also follow the subcommand.

Exit status: 0 done; 1 something asked for could not be done (an unknown id - named
on stderr - the sender or the queue lock out of reach, `check` found problems);
2 a bad argument or an unusable config. Each error is one line on stderr, never a
traceback. `status` exits 0 whatever it finds.

This module parses and dispatches; changes.py changes, listing.py lists, show.py,
check.py and status.py do what their names say. Each is imported by the command
that needs it: `mailbag queue` in a cron job should not pay for loading the
programs' start-up code that `check` calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from services.admin.errors import AdminError
from shared.config import (
    ENV_VAR,
    REPO_ROOT,
    Config,
    ConfigError,
    load_config,
    resolve_config_path,
)

if TYPE_CHECKING:
    from services.admin.changes import AdminLog, Result

PROG = "mailbag"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad command line; str() is one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing its usage and exiting: one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    config_option = _Parser(add_help=False)
    config_option.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS,
        help=f"TOML config (default: ${ENV_VAR}, else mailbag.toml at the repository root)")
    parser = _Parser(prog=PROG, parents=[config_option],
                     description="mailbag's administrator command (see README: Operating mailbag)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text, parents=[config_option])

    queue = command("queue", "list the queue: one line per message")
    queue.add_argument("--failed", action="store_true", help="list the failed messages")
    queue.add_argument("--json", action="store_true", help="one JSON object per line")
    show_ = command("show", "one message: its state, envelope and headers")
    show_.add_argument("id")
    show_.add_argument("--body", action="store_true", help="the whole message")
    command("flush", "deferred messages due now (all, or these), the sender woken").add_argument(
        "ids", nargs="*", metavar="ID")
    command("hold", "keep messages queued, unsent, until released").add_argument(
        "ids", nargs="+", metavar="ID")
    command("release", "let held messages go").add_argument("ids", nargs="+", metavar="ID")
    delete = command("delete", "remove messages from the queue (or the failed folder)")
    delete.add_argument("ids", nargs="*", metavar="ID")
    delete.add_argument("--all", action="store_true", help="every queued message")
    delete.add_argument("--failed", action="store_true",
                        help="from the failed folder (without ids: every failed message)")
    command("requeue", "failed messages back into the queue, as new").add_argument(
        "ids", nargs="+", metavar="ID")
    command("check", "check the config and every file it names")
    status_ = command("status", "the programs, the queue, the last delivery and error")
    status_.add_argument("--supervisord-conf", metavar="FILE",
                         default=str(REPO_ROOT / "supervisord.conf"),
                         help="supervisord's config (default: the repository's)")
    keygen = command("dkim-keygen", "make a DKIM key and print the DNS record to publish")
    keygen.add_argument("domain")
    keygen.add_argument("selector")
    keygen.add_argument("--dir", metavar="FOLDER",
                        help="where the key goes (default: dkim/ next to the config)")
    keygen.add_argument("--ed25519", action="store_true", help="an Ed25519 key (RFC 8463)")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as err:
        return _error(f"{err} (see {PROG} --help)", EXIT_USAGE)
    except ConfigError as err:
        return _error(str(err), EXIT_USAGE)
    except AdminError as err:
        return _error(str(err), EXIT_FAILED)
    except BrokenPipeError:  # `mailbag queue | head`: the reader left
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        return _error("interrupted", EXIT_FAILED)


def _error(text: str, code: int) -> int:
    print(f"{PROG}: {text}", file=sys.stderr)
    return code


def _config(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(getattr(args, "config", None)))


def _unique(ids: Sequence[str]) -> list[str]:
    """The ids in the order given, each once: an id named twice is changed once, and
    its one result is what was done to it (a second "delete" would answer "not in
    the queue" for a message the first one removed)."""
    return list(dict.fromkeys(ids))


def _print(lines: Iterable[str]) -> None:
    for line in lines:
        print(line)


# ---------------------------------------------------------------------------- reading

def cmd_queue(args: argparse.Namespace) -> int:
    from services.admin import listing

    config = _config(args)
    try:
        _print(listing.list_queue(config, failed=args.failed, as_json=args.json,
                                  now=time.time()))
    except listing.ListingError as err:
        raise AdminError(str(err)) from None
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from services.admin import show
    from shared.queue import QueueFormatError

    config = _config(args)
    try:
        lines = list(show.show(config, args.id, body=args.body, now=time.time()))
    except show.NotFound:
        raise AdminError(f"{args.id}: no such message in the queue or the failed "
                         "folder") from None
    except FileNotFoundError:
        raise AdminError(f"{args.id}: gone meanwhile (delivered or removed)") from None
    except QueueFormatError as err:
        raise AdminError(f"{args.id}: not a queue file: {err}") from None
    except OSError as err:
        raise AdminError(f"{args.id}: cannot be read: {err.strerror or err}") from None
    sys.stdout.flush()
    sys.stdout.buffer.writelines(lines)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from services.admin import check

    path = resolve_config_path(getattr(args, "config", None))
    problems = check.run_checks(path)
    _print(problems)
    if problems:
        return EXIT_FAILED
    print(f"{path}: no problems found (as {check.invoking_user()})")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from services.admin import status
    from services.admin.supervisor import SupervisorConf, SupervisorUnavailable

    now = time.time()
    try:
        conf, conf_problem = SupervisorConf.read(args.supervisord_conf), ""
    except SupervisorUnavailable as err:
        conf, conf_problem = None, str(err)
    path = resolve_config_path(getattr(args, "config", None))
    try:
        config, config_problem = load_config(path), ""
    except ConfigError as err:  # a broken config is part of the status, not its end
        config, config_problem = None, str(err)
    report = status.gather(path, config, config_problem, conf, conf_problem, now)
    _print(status.format_status(report, now))
    return EXIT_OK


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    """Write a new key (never over an existing one) and print the [dkim] lines and the
    TXT record to publish: from key generation to the DNS in one step."""
    from pathlib import Path

    from shared.config import is_dns_name
    from shared.dkim import keygen

    for name, value in (("domain", args.domain), ("selector", args.selector)):
        if not is_dns_name(value):
            raise UsageError(f"{name} {value!r} is not a DNS name")
    path = resolve_config_path(getattr(args, "config", None))
    folder = Path(args.dir) if args.dir else path.parent / "dkim"
    try:
        key = keygen(args.domain, args.selector, folder,
                     algorithm="ed25519" if args.ed25519 else "rsa", bits=args.bits)
    except FileExistsError as err:
        raise AdminError(f"{err.filename}: a key is there already (remove it first, "
                         "or choose another selector)") from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise AdminError(f"{folder}: cannot write the key: {err.strerror or err}") from None
    print(f"wrote {key.path} (mode 0600); add to {path}:\n")
    print(f"[dkim]\ndomain = \"{args.domain}\"\nselector = \"{args.selector}\"\n"
          f"key_file = \"{key.path}\"\n")
    print("and publish this record in the DNS of the domain:\n")
    print(key.record)
    return EXIT_OK


# ---------------------------------------------------------------------------- changing

def cmd_change(args: argparse.Namespace) -> int:
    """hold, release, flush: through the sender or as the queue's owner."""
    from services.admin import changes

    config = _config(args)
    log = changes.AdminLog(config, _warn)
    results, via = changes.change_queued(config, args.command, _unique(args.ids))
    status_code = _report(args.command, results, log, via=via)
    if args.command == "flush":
        if not args.ids:  # every deferred one: say how many, even none
            log.note("flush", deferred=len(results), via=via)
            if not results:
                print("no deferred messages")
        if via != changes.VIA_SENDER:
            print("no sender is running: the messages are due when it starts")
    return status_code


def cmd_delete(args: argparse.Namespace) -> int:
    if args.all and args.ids:
        raise UsageError("delete takes ids or --all, not both")
    if not (args.ids or args.all or args.failed):
        raise UsageError("delete needs ids, --all or --failed")
    from services.admin import changes

    config = _config(args)
    log = changes.AdminLog(config, _warn)
    status_code = EXIT_OK
    if args.failed:
        names = _unique(args.ids) or changes.failed_ids(config)
        status_code = _each("delete", names, lambda name: changes.delete_failed(config, name),
                            log, where="failed", missing_ok=not args.ids)
    if args.all:
        results, via = changes.change_queued(config, "delete", changes.queued_ids(config))
        _report("delete", results, log, via=via, missing_ok=True)
    elif args.ids and not args.failed:
        results, via = changes.change_queued(config, "delete", _unique(args.ids))
        status_code = _report("delete", results, log, via=via)
    return status_code


def cmd_requeue(args: argparse.Namespace) -> int:
    from services.admin import changes

    config = _config(args)
    log = changes.AdminLog(config, _warn)
    return _each("requeue", _unique(args.ids), lambda name: changes.requeue(config, name), log)


def _each(action: str, names: Sequence[str], change: Callable[[str], Result], log: AdminLog,
          **options: Any) -> int:
    """Change one message after the other; what was done is reported and logged even
    when one of them fails (AdminError) and ends the command."""
    results: list[Result] = []
    try:
        for name in names:
            results.append(change(name))
    finally:
        status_code = _report(action, results, log, **options)
    return status_code


def _report(action: str, results: list[Result], log: AdminLog, *,
            missing_ok: bool = False, **details: str) -> int:
    """Print what became of each id, log it (one ADMIN line per id); 1 if an id was
    not found (unless `missing_ok`: a message delivered since it was listed)."""
    from services.admin.listing import printable

    status_code = EXIT_OK
    for result in results:
        log.record(action, result, **details)
        # An id may be a file name someone put into a folder: control characters and
        # bytes that are not UTF-8 must reach neither the terminal nor a strict stdout.
        shown = printable(result.queue_id)
        if result.found or missing_ok:
            print(f"{shown}: {result.text}")
        else:
            _error(f"{shown}: {result.text}", EXIT_FAILED)
            status_code = EXIT_FAILED
    return status_code


def _warn(text: str) -> None:
    print(f"{PROG}: warning: {text}", file=sys.stderr)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "queue": cmd_queue,
    "show": cmd_show,
    "flush": cmd_change,
    "hold": cmd_change,
    "release": cmd_change,
    "delete": cmd_delete,
    "requeue": cmd_requeue,
    "check": cmd_check,
    "status": cmd_status,
    "dkim-keygen": cmd_dkim_keygen,
}
