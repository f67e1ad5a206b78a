"""Every reply the receiver sends, in one place (naming: S<code>_<WHAT>).

Texts with `{hostname}` etc. are filled in with `Reply.format`. Enhanced status
codes (RFC 3463) are rendered only in sessions that greeted with EHLO (RFC 2034).
Tests import these constants; nobody retypes a reply text.
"""

from shared.smtp import Reply

S220_GREETING = Reply(220, "{hostname} ESMTP Service ready")
S221_CLOSING = Reply(221, "{hostname} closing connection", "2.0.0")
S214_HELP = Reply(
    214,
    "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP HELP QUIT\n"
    "See RFC 5321; mail goes MAIL FROM:<you> RCPT TO:<them> DATA",
    "2.0.0",
)
S250_HELO = Reply(250, "{hostname} Hello {client}")
S250_OK = Reply(250, "Ok", "2.0.0")
S250_SENDER_OK = Reply(250, "<{address}>... Sender ok", "2.1.0")
S250_RECIPIENT_OK = Reply(250, "<{address}>... Recipient ok", "2.1.5")
S250_QUEUED = Reply(250, "Ok: queued as {queue_id}", "2.0.0")
S250_RESET = Reply(250, "Reset state", "2.0.0")
S354_START_DATA = Reply(354, "End data with <CR><LF>.<CR><LF>")

S421_UNAVAILABLE = Reply(421, "{hostname} Service not available, closing transmission channel")
S421_TIMEOUT = Reply(
    421, "{hostname} Service not available, closing transmission channel (timeout)", "4.4.2"
)
S421_SHUTDOWN = Reply(
    421, "{hostname} Service not available, closing transmission channel (shutdown)", "4.3.2"
)
S421_TOO_MANY_ERRORS = Reply(
    421, "{hostname} Service not available, closing transmission channel (too many errors)",
    "4.7.0",
)
S421_LOCAL_ERROR = Reply(
    421, "{hostname} Service not available, closing transmission channel (local error)", "4.3.0"
)
S451_LOCAL_ERROR = Reply(451, "Requested action aborted: local error in processing", "4.3.0")
S452_NO_SPACE = Reply(452, "Insufficient system storage", "4.3.1")
S452_TOO_MANY_RECIPIENTS = Reply(452, "Too many recipients", "4.5.3")

S500_UNRECOGNISED = Reply(500, "Command unrecognized", "5.5.1")
S500_LINE_TOO_LONG = Reply(500, "Line too long", "5.5.2")
S500_BARE_CR = Reply(500, "Bare <CR> or NUL in command line", "5.5.2")
S501_SYNTAX = Reply(501, "{detail}", "5.5.4")
S501_BAD_ADDRESS = Reply(501, "{detail}", "5.1.3")  # a recipient's (destination)
S501_BAD_SENDER = Reply(501, "{detail}", "5.1.7")
S501_HELO_SYNTAX = Reply(501, "Syntax: {verb} hostname", "5.5.4")
S501_NO_ARGUMENTS = Reply(501, "Syntax: {verb} takes no arguments", "5.5.4")
S502_NOT_IMPLEMENTED = Reply(502, "Command not implemented", "5.5.1")
S503_BAD_SEQUENCE = Reply(503, "Bad sequence of commands: {hint}", "5.5.1")
S554_RELAY_DENIED = Reply(554, "<{address}>: Relay access denied", "5.7.1")
S550_BAD_MAILBOX = Reply(550, "<{address}>: no such local mailbox name ({why})", "5.1.3")
S553_NEEDS_SMTPUTF8 = Reply(
    553, "<{address}>: an address that is not ASCII needs MAIL ... SMTPUTF8 (RFC 6531)", "5.6.7"
)
S552_TOO_BIG = Reply(552, "Message size exceeds fixed limit of {limit} bytes", "5.3.4")
S554_BARE_NEWLINE = Reply(
    554, "Message rejected: bare <CR> or <LF> or NUL in data (RFC 5321 §2.3.8)", "5.6.0"
)
S554_LINE_TOO_LONG = Reply(
    554, "Message rejected: a line is longer than 1000 octets (RFC 5321 §4.5.3.1.6)", "5.6.0"
)
S554_TOO_MANY_HOPS = Reply(
    554, "Too many hops: {hops} Received: fields, more than {limit} (a routing loop?)", "5.4.6"
)
S555_BAD_PARAMETER = Reply(555, "Unsupported parameter {name}", "5.5.4")

# Why a command is out of sequence (503), by verb.
SEQUENCE_HINTS = {
    "HELO": "already greeted",
    "EHLO": "already greeted",
    "MAIL": "send HELO/EHLO first, or finish the current transaction",
    "RCPT": "need MAIL before RCPT",
    "DATA": "need RCPT before DATA",
}

# STARTTLS (RFC 3207) and AUTH (RFC 4954).
S220_READY_FOR_TLS = Reply(220, "Ready to start TLS", "2.0.0")
S235_AUTH_OK = Reply(235, "Authentication successful", "2.7.0")
S334_CHALLENGE = Reply(334, "{challenge}")
S501_AUTH_SYNTAX = Reply(501, "Cannot decode AUTH response", "5.5.2")
S501_AUTH_CANCELLED = Reply(501, "Authentication cancelled", "5.7.0")
S503_ALREADY_AUTHENTICATED = Reply(503, "Already authenticated", "5.5.1")
S504_AUTH_MECHANISM = Reply(504, "Unrecognized authentication mechanism", "5.5.4")
S530_AUTH_REQUIRED = Reply(530, "Authentication required", "5.7.0")
S535_AUTH_FAILED = Reply(535, "Authentication credentials invalid", "5.7.8")
S538_ENCRYPTION_REQUIRED = Reply(
    538, "Encryption required for requested authentication mechanism", "5.7.11"
)
