"""Text that is safe to put on an operator's terminal.

Remote replies, header lines and client-supplied names reach ``mta queue``
output and ``log.format: text`` lines; a control character among them
(ESC above all) would be interpreted by the terminal: clear the screen,
rewrite earlier lines, set the window title.  ``escape`` turns every C0/C1
control character and DEL into a visible ``\\xNN`` escape and never fails:
it only ever returns a longer string.  JSON output needs none of this,
because the JSON encoder already escapes control characters.
"""

from __future__ import annotations

import re

# C0 controls, DEL and C1 controls (U+0080-U+009F, which some terminals
# honour as 8-bit CSI).  A backslash is doubled so an escape cannot be forged.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def _one(match: re.Match[str]) -> str:
    char = match.group()
    return "\\\\" if char == "\\" else f"\\x{ord(char):02x}"


def escape(text: str, keep: str = "") -> str:
    """``text`` with control characters shown as ``\\xNN``; characters in ``keep`` stay as they are."""
    if keep:
        return re.sub(_CONTROL, lambda m: m.group() if m.group() in keep else _one(m), text)
    return _CONTROL.sub(_one, text)


def escape_block(text: str) -> str:
    """A multi-line block (a message header): line breaks and tabs kept, every other control escaped."""
    return "\n".join(escape(line, keep="\t") for line in text.replace("\r\n", "\n").split("\n"))
