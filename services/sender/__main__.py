"""`python -m services.sender --config FILE`: run the sender in the foreground."""

from services.sender.app import main
from shared.cli import run_program

if __name__ == "__main__":
    run_program("sender", "mailbag Sender-SMTP: deliver the queue to the relay and Maildirs", main)
