"""Real test peers for kubemta's tests: unbound (DNS), smtp-sink, a private Postfix.

Every peer runs on loopback only, bounds its waits, and stops exactly the
processes it started.  Fixtures live in `tests.peers.fixtures`.
"""

from .dns import DnsServer
from .net import free_port, wait_port
from .postfix import PostfixServer
from .sink import SinkMessage, SmtpSink

__all__ = ["DnsServer", "PostfixServer", "SinkMessage", "SmtpSink", "free_port", "wait_port"]
