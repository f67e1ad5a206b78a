"""Receiver-SMTP (R-SMTP): the SMTP server that durably queues every message."""
