"""`mailbag-sendmail`, the sendmail interface (SPEC §7).

    options.py      the sendmail command line (getopt-style, Postfix's flags), pure
    submission.py   the message as it is queued: recipients, added fields, pure
    spool.py        the durable write into the queue and the SUBMIT log line
    stdio.py        -bs: SMTP on stdin/stdout around the receiver's ServerSession
    app.py          the command: modes, exit codes (sysexits.h), one-line errors
"""
