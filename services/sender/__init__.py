"""Sender-SMTP (S-SMTP): drains the queue through the smarthost or into local Maildirs."""
