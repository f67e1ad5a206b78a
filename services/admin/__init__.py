"""The administrator's side of mailbag (SPEC §7): listing.py is the read-only queue
listing that `mailbag queue`, `mailbag-sendmail -bp` and `mailq` print."""
