"""services/sendmail/options.py: the sendmail command line as real callers write it."""

from __future__ import annotations

import shlex

import pytest

from services.sendmail.options import Mode, Options, UsageError, parse_command_line

# (command line after the program name, the fields of Options that differ from the default)
ACCEPTED = [
    # cron (Debian's cron, do_command.c): attached values everywhere
    ("-FCronDaemon -i -B8BITMIME -oem root",
     {"full_name": "CronDaemon", "dot_ends_input": False, "recipients": ("root",)}),
    # mutt's default, `set sendmail="/usr/sbin/sendmail -oem -oi"`, then -- and addresses
    ("-oem -oi -- a@example.com b@example.com",
     {"dot_ends_input": False, "recipients": ("a@example.com", "b@example.com")}),
    # PHP's sendmail_path default
    ("-t -i", {"extract_recipients": True, "dot_ends_input": False}),
    # git send-email with --envelope-sender
    ("-i -f me@example.com you@example.org",
     {"dot_ends_input": False, "sender": "me@example.com", "recipients": ("you@example.org",)}),
    ("-ti", {"extract_recipients": True, "dot_ends_input": False}),
    ("-it -fme@x.org", {"extract_recipients": True, "dot_ends_input": False,
                        "sender": "me@x.org"}),
    ("-F 'Cron Daemon' root", {"full_name": "Cron Daemon", "recipients": ("root",)}),
    ("-r old@x.org root", {"sender": "old@x.org", "recipients": ("root",)}),
    ("-f <> root", {"sender": "<>", "recipients": ("root",)}),
    ("-bm root", {"recipients": ("root",)}),
    ("-bp", {"mode": Mode.LIST_QUEUE}),
    ("-bs", {"mode": Mode.SMTP}),
    ("-bi", {"mode": Mode.NEWALIASES}),
    ("-I", {"mode": Mode.NEWALIASES}),
    ("-o i root", {"dot_ends_input": False, "recipients": ("root",)}),
    ("-odb -oQ/var/spool -om -o7 -v -N never -R hdrs -V envid -X /tmp/log -L label -h 20"
     " -G -U -n -m -x -c -C /etc/postfix -Ac -e m -p smtp -O x=y -B 7bit -q30m root",
     {"recipients": ("root",)}),
    ("--config /etc/mailbag.toml root", {"config": "/etc/mailbag.toml", "recipients": ("root",)}),
    ("--config=/etc/m.toml -t", {"config": "/etc/m.toml", "extract_recipients": True}),
    ("-- -strange@x.org", {"recipients": ("-strange@x.org",)}),
    ("", {}),
]


@pytest.mark.parametrize(("line", "expected"), ACCEPTED, ids=[a[0] or "empty" for a in ACCEPTED])
def test_accepted(line: str, expected: dict) -> None:
    assert parse_command_line(shlex.split(line)) == Options(**expected)


REFUSED = [
    ("-Z root", "unknown option -Z"),
    ("-tZ", "unknown option -Z"),
    ("--verbose root", "unknown option --verbose"),
    ("--config", "--config needs a file name"),
    ("-f", "option -f needs a value"),
    ("-F", "option -F needs a value"),
    ("-bd", "-bd is not supported"),
    ("-bv root", "-bv is not supported"),
    ("-bpx", "-bpx is not supported"),
    ("-B binary root", "-B takes 7BIT or 8BITMIME"),
    ("-q", "-q: the sender runs the queue by itself"),
    ("root -oi", "option -oi after the recipients"),
    ("-bp root", "-bp takes no recipients"),
    ("-bs -t", "-t can be used only when a message is sent"),
]


@pytest.mark.parametrize(("line", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused(line: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_command_line(shlex.split(line))
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("program", "mode"), [
    ("/usr/bin/mailq", Mode.LIST_QUEUE),
    ("mailq", Mode.LIST_QUEUE),
    ("/usr/bin/newaliases", Mode.NEWALIASES),
    ("/usr/sbin/sendmail", Mode.ENQUEUE),
    ("/x/.venv/bin/mailbag-sendmail", Mode.ENQUEUE),
])
def test_the_program_name_picks_the_mode(program: str, mode: Mode) -> None:
    assert parse_command_line([], program).mode is mode


def test_a_mode_flag_overrides_the_program_name() -> None:
    assert parse_command_line(["-bm", "root"], "mailq").mode is Mode.ENQUEUE
