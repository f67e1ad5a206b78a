"""`python -m services.sendmail ...`: the same as the `mailbag-sendmail` script."""

from services.sendmail.app import run

if __name__ == "__main__":
    run()
