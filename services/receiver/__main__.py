"""`python -m services.receiver --config FILE`: run the receiver in the foreground."""

from services.receiver.app import main
from shared.cli import run_program

if __name__ == "__main__":
    run_program("receiver", "mailbag Receiver-SMTP: accept mail and queue it durably", main)
