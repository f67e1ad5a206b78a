"""`python -m services.receiver --config FILE`: run the receiver in the foreground."""

from shared.signals import StopFlag

# First of all: a TERM during start-up (the imports below take a while) is a stop.
STOP = StopFlag().install()

from services.receiver.app import main  # noqa: E402
from shared.cli import run_program  # noqa: E402

if __name__ == "__main__":
    run_program("receiver", "mailbag Receiver-SMTP: accept mail and queue it durably", main, STOP)
