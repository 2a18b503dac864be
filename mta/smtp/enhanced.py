"""Enhanced status codes for the replies aiosmtpd writes itself.

Every 2xx/4xx/5xx reply a client sees carries an RFC 3463 enhanced status
code (RFC 2034); aiosmtpd's own replies ("503 Error: need MAIL command")
have none, so the listener completes them here.  Failure: none; a line
that is no reply is returned unchanged.
"""

from __future__ import annotations

import re

# By basic code.
_DEFAULT_ENHANCED = {
    211: "2.0.0", 214: "2.0.0", 221: "2.0.0", 235: "2.7.0", 250: "2.0.0", 252: "2.0.0",
    421: "4.3.2", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 534: "5.7.9", 535: "5.7.8", 538: "5.7.11",
    550: "5.0.0", 551: "5.1.6", 552: "5.3.4", 553: "5.1.3", 554: "5.0.0", 555: "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_CODE = re.compile(r"^([245]\d\d)([ -])(.*)$", re.DOTALL)


def add_enhanced_code(line: str) -> str:
    """``'503 Error: need MAIL command'`` -> ``'503 5.5.1 Error: need MAIL command'``."""
    if _HAS_ENHANCED.match(line):
        return line
    match = _CODE.match(line)
    if not match:
        return line  # 3xx intermediate replies carry no enhanced code
    code = int(match.group(1))
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code // 100}.0.0")
    return f"{code}{match.group(2)}{enhanced} {match.group(3)}"
