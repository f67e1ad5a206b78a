"""Match replies against the catalogue in `services.receiver.replies`, never retyping a text.

A catalogue entry such as `Reply(250, "Ok: queued as {queue_id}", "2.0.0")` is a
template: `matches(reply, R.S250_QUEUED)` checks the code, the enhanced code and the
text with every `{field}` standing for any text; `fields()` returns what they were.
"""

from __future__ import annotations

import re
import string

from shared.smtp import Reply


def reply_pattern(template: Reply) -> re.Pattern[str]:
    """A regex for every text the template can produce; each {field} is a named group."""
    parts: list[str] = []
    seen: set[str] = set()
    for literal, name, _spec, _conversion in string.Formatter().parse(template.text):
        parts.append(re.escape(literal))
        if name is None:
            continue
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>.*?)")
        seen.add(name)
    return re.compile("".join(parts), re.DOTALL)


def fields(reply: Reply, template: Reply) -> dict[str, str] | None:
    """The values of the template's fields in `reply`, or None if it does not match."""
    if reply.code != template.code or reply.enhanced != template.enhanced:
        return None
    match = reply_pattern(template).fullmatch(reply.text)
    return match.groupdict() if match else None


def matches(reply: Reply, template: Reply) -> bool:
    return fields(reply, template) is not None
