"""Signed VERP return paths: which message and recipient a later bounce is about.

With ``feedback.domain`` set, the courier sends each message with the
envelope sender ``bounce+<id>-<tag>=<local>=<domain>@<feedback domain>``
for a transaction with one recipient (VERP: the recipient's ``@`` becomes
``=``), and ``bounce+<id>-<tag>@<feedback domain>`` for several (one
transaction stays one transaction; the report's ``Final-Recipient`` names
the address then).  A recipient whose address cannot stand in a local part
(too long for 64 octets, non-ASCII, quoted) is left out the same way.

``tag`` is an HMAC-SHA256 of the queue id and recipient under
``feedback.secret_file``, 13 base32 characters (65 bits): a report to a
return path nobody could have been given is refused, so nobody can have an
address suppressed by mailing a forged bounce.

Failure: ``parse`` returns None for any address that is not a return path
of ours with a valid tag; it never raises.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

PREFIX = "bounce+"
TAG_LENGTH = 13
LOCAL_PART_MAX = 64  # RFC 5321 §4.5.3.1.1
_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/?^_`{|}~.-]+$")  # dot-atom characters, less "=" (our separator)
_ADDRESS = re.compile(rf"^{re.escape(PREFIX)}(?P<id>[A-Za-z0-9]+)-(?P<tag>[a-z2-7]{{{TAG_LENGTH}}})"
                      r"(?:=(?P<local>[^@=]+)=(?P<domain>[^@=]+))?@(?P<at>.+)$")


@dataclass(frozen=True)
class Tagged:
    queue_id: str
    recipient: str | None  # None: a return path given to several recipients


class ReturnPaths:
    def __init__(self, domain: str, key: bytes) -> None:
        self.domain = domain.lower().rstrip(".")
        self.key = key

    def _tag(self, queue_id: str, recipient: str | None) -> str:
        digest = hmac.new(self.key, f"{queue_id}\0{(recipient or '').lower()}".encode(), hashlib.sha256).digest()
        return base64.b32encode(digest).decode().lower()[:TAG_LENGTH]

    def sender(self, queue_id: str, recipients: list[str]) -> str:
        """The return path for one transaction of ``queue_id`` to ``recipients``."""
        if len(recipients) == 1:
            local, _, domain = recipients[0].rpartition("@")
            if local and domain and _ATOM.match(local) and _ATOM.match(domain) and "=" not in local + domain:
                tagged = f"{PREFIX}{queue_id}-{self._tag(queue_id, recipients[0])}={local}={domain}"
                if len(tagged) <= LOCAL_PART_MAX:
                    return f"{tagged}@{self.domain}"
        return f"{PREFIX}{queue_id}-{self._tag(queue_id, None)}@{self.domain}"

    def parse(self, address: str) -> Tagged | None:
        """What a return path of ours says, or None (not ours, or a tag that does not verify)."""
        found = _ADDRESS.match(address.strip().strip("<>"))
        if found is None or found["at"].lower().rstrip(".") != self.domain:
            return None
        recipient = f"{found['local']}@{found['domain']}" if found["local"] else None
        if not hmac.compare_digest(found["tag"], self._tag(found["id"], recipient)):
            return None
        return Tagged(found["id"], recipient)
