"""`python -m services.sender --config FILE`: run the sender in the foreground."""

from shared.signals import ReloadFlag, StopFlag

# First of all: a TERM during start-up (the imports below take a while) is a stop,
# a HUP a reload once running (never the end of the program).
STOP = StopFlag().install()
RELOAD = ReloadFlag().install()

from services.sender.app import main  # noqa: E402
from shared.cli import run_program  # noqa: E402

if __name__ == "__main__":
    run_program("sender", "mailbag Sender-SMTP: deliver the queue to the relay and Maildirs",
                main, STOP, reload=RELOAD)
