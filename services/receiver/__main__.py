"""`python -m services.receiver --config FILE`: run the receiver in the foreground."""

from shared.signals import ReloadFlag, StopFlag

# First of all: a TERM during start-up (the imports below take a while) is a stop,
# a HUP a reload once running (never the end of the program).
STOP = StopFlag().install()
RELOAD = ReloadFlag().install()

from services.receiver.app import main  # noqa: E402
from shared.cli import run_program  # noqa: E402

if __name__ == "__main__":
    run_program("receiver", "mailbag Receiver-SMTP: accept mail and queue it durably",
                main, STOP, reload=RELOAD)
