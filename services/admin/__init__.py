"""The administrator's side of mailbag (SPEC §7): the `mailbag` command (cli.py) and
its parts - listing.py, the read-only queue listing that `mailbag queue`,
`mailbag-sendmail -bp` and `mailq` print; changes.py (hold, release, delete, flush,
requeue); show.py; check.py; status.py with supervisor.py."""
