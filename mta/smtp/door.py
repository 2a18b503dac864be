"""The front door of a listener: every connection from accept until its SMTP session starts.

``Slots`` counts a listener's connections from the moment they are accepted
until they close: TLS handshakes, PROXY headers not read yet and SMTP
sessions alike.  It counts them in all, per client address, and those of
clients outside the listener's ``trusted_networks``, which may not take the
``limits.reserved`` slots kept for trusted ones.

``Front`` is the protocol factory a listener serves.  At accept it refuses a
connection from outside ``proxy_sources`` on a PROXY listener, and one past
``max_connections``, past ``max_connections_per_ip`` or into the reserved
slots, with a ``421`` before any banner.  On an implicit-TLS listener it only
closes such a connection, since nothing can be said there before TLS.  It
runs implicit-TLS handshakes itself, bounded in time
(``tls_handshake_timeout``) and in number (``max_tls_handshakes``, per address
``max_tls_handshakes_per_ip``; clients in ``trusted_networks`` are not held
to the total); only a finished handshake makes a session.
Behind a PROXY balancer the client's address is known only from the header,
so the session calls ``Slot.identify`` once it has read it.

Failure: a refused or failed connection is closed and its slot released; a
refusal logs a ``rejected`` event naming its reason.  Nothing here raises into
the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import ssl
from collections.abc import Callable
from typing import Protocol

from mta import replies
from mta.config import LimitsConfig, ListenerConfig
from mta.obs.log import event
from mta.policy.relay import client_ip, is_trusted
from mta.replies import Reply
from mta.smtp.tls import start_server_tls

log = logging.getLogger(__name__)

LINGER = 1.0  # seconds a refused PROXY client has to read its reply and go

Refusal = tuple[Reply, str]  # the reply and the reason logged with it


class Slots:
    """The connections of one listener (in one process)."""

    def __init__(self, limits: LimitsConfig, reserved: int) -> None:
        self.limits = limits
        self.reserved = reserved  # 0 where the listener trusts nobody
        self.total = 0
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.untrusted = 0
        self.handshakes = 0
        self.handshakes_per_ip: collections.Counter[str] = collections.Counter()

    def claim(self, peer: str) -> Slot | None:
        """A slot for a connection just accepted; None when the listener is full."""
        if self.total >= self.limits.max_connections:
            return None
        self.total += 1
        return Slot(self, peer)


class Slot:
    """One connection's share of its listener's limits, given back once by ``release``."""

    def __init__(self, slots: Slots, peer: str) -> None:
        self.slots = slots
        self.ip = peer  # the client: the peer, or behind a balancer the address its header names
        self.identified = False
        self.trusted = False
        self.handshaking = False
        self.in_session = False  # set by the session once its connection is made
        self.released = False

    def identify(self, ip: str, trusted: bool) -> Refusal | None:
        """Count the connection for client ``ip``, or say why it is refused (the caller then releases it)."""
        slots, limits = self.slots, self.slots.limits
        if slots.per_ip[ip] >= limits.max_connections_per_ip:
            return replies.TOO_MANY_FROM_YOU, "connections per address"
        if not trusted and slots.untrusted >= limits.max_connections - slots.reserved:
            return replies.TOO_MANY_CONNECTIONS, "connections left are reserved for trusted networks"
        self.ip, self.trusted, self.identified = ip, trusted, True
        slots.per_ip[ip] += 1
        if not trusted:
            slots.untrusted += 1
        return None

    def start_handshake(self) -> Refusal | None:
        slots, limits = self.slots, self.slots.limits
        # Trusted clients are bounded by their reserved slots instead, so a
        # flood of handshakes from elsewhere cannot lock them out.
        if slots.handshakes >= limits.max_tls_handshakes and not self.trusted:
            return replies.TLS_HANDSHAKES_BUSY, "TLS handshakes in progress"
        if slots.handshakes_per_ip[self.ip] >= limits.max_tls_handshakes_per_ip:
            return replies.TLS_HANDSHAKES_BUSY, "TLS handshakes in progress from this address"
        self.handshaking = True
        slots.handshakes += 1
        slots.handshakes_per_ip[self.ip] += 1
        return None

    def end_handshake(self) -> None:
        if not self.handshaking:
            return
        self.handshaking = False
        slots = self.slots
        slots.handshakes -= 1
        _decrement(slots.handshakes_per_ip, self.ip)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.end_handshake()
        slots = self.slots
        slots.total -= 1
        if self.identified:
            _decrement(slots.per_ip, self.ip)
            if not self.trusted:
                slots.untrusted -= 1


def _decrement(counter: collections.Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]  # a Counter keeps zeros: addresses seen once would pile up


class Session(Protocol):
    """What the front door needs of an SMTP session protocol."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...


class _Door(asyncio.Protocol):
    """The protocol of an accepted connection until the front door hands it on (or closes it)."""

    def __init__(self, front: Front) -> None:
        self.front = front

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.front.accept(transport)


class _Lingering(asyncio.Protocol):
    """A refused connection after its reply: input is discarded until the client closes or LINGER passes."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.timer.cancel()
        self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


class Front:
    """Admission at accept, and implicit TLS, for one listener."""

    def __init__(self, listener: ListenerConfig, limits: LimitsConfig, session: Callable[[Slot], Session],
                 tls: Callable[[], ssl.SSLContext] | None = None) -> None:
        self.listener = listener
        self.limits = limits
        # Reserving slots for trusted clients means something only where some are trusted.
        self.slots = Slots(limits, limits.reserved if listener.trusted_networks else 0)
        self.session = session
        self.tls = tls  # the context for implicit TLS, asked for per connection (it may have been reloaded)
        self.handshaking: set[asyncio.Transport] = set()
        self.closed = False

    def protocol(self) -> asyncio.Protocol:
        """The factory ``loop.create_server`` calls for each connection it accepts."""
        return _Door(self)

    def accept(self, transport: asyncio.Transport) -> None:
        peer_ip = client_ip(transport.get_extra_info("peername"))
        peer = str(peer_ip) if peer_ip is not None else "?"
        if self.closed:
            transport.close()
            return
        listener = self.listener
        if listener.proxy_protocol and not is_trusted(peer, listener.proxy_sources):
            self.refuse(transport, peer, replies.PROXY_NOT_ALLOWED, "PROXY listener, peer outside proxy_sources")
            return
        slot = self.slots.claim(peer)
        if slot is None:
            self.refuse(transport, peer, replies.TOO_MANY_CONNECTIONS, "max_connections")
            return
        # Behind a balancer every peer is the balancer: the session identifies
        # the client once it has read the PROXY header.
        if not listener.proxy_protocol:
            refusal = slot.identify(peer, is_trusted(peer, listener.trusted_networks))
            if refusal is not None:
                slot.release()
                self.refuse(transport, peer, *refusal)
                return
        if self.tls is not None:
            self._handshake(transport, slot)
            return
        session = self.session(slot)
        transport.set_protocol(session)  # type: ignore[arg-type]
        session.connection_made(transport)

    def refuse(self, transport: asyncio.Transport, client: str, reply: Reply, reason: str) -> None:
        event("rejected", level=logging.WARNING, listener=self.listener.name, client=client, reply=str(reply),
              reason=reason)
        if self.tls is None:
            transport.write(f"{reply}\r\n".encode())
            if self.listener.proxy_protocol and transport.can_write_eof():
                # Behind PROXY the client speaks first: closing with its header unread
                # in the socket makes the kernel send a reset, which can destroy the
                # refusal before the client reads it. Say it, half-close, and discard
                # what still comes for a moment. (Elsewhere a client waits for the
                # banner, so nothing is unread and the descriptor goes at once.)
                transport.set_protocol(_Lingering(transport))
                transport.write_eof()
                return
        transport.close()

    def _handshake(self, transport: asyncio.Transport, slot: Slot) -> None:
        refusal = slot.start_handshake()
        if refusal is not None:
            slot.release()
            self.refuse(transport, slot.ip, *refusal)
            return
        assert self.tls is not None
        session = self.session(slot)
        timeout = self.limits.tls_handshake_timeout
        loop = asyncio.get_running_loop()
        done = start_server_tls(transport, session, self.tls(), timeout)  # type: ignore[arg-type]
        self.handshaking.add(transport)
        done.add_done_callback(functools.partial(self._handshake_over, transport, slot, loop.time() + timeout))

    def _handshake_over(self, transport: asyncio.Transport, slot: Slot, deadline: float,
                        done: asyncio.Future[None]) -> None:
        self.handshaking.discard(transport)
        slot.end_handshake()
        error = None if done.cancelled() else done.exception()
        if error is None and slot.in_session:
            return  # the session has the connection now, and gives the slot back when it closes
        if isinstance(error, ConnectionAbortedError) and asyncio.get_running_loop().time() >= deadline - 0.05:
            event("rejected", level=logging.WARNING, listener=self.listener.name, client=slot.ip,
                  reply=str(replies.TLS_HANDSHAKE_TIMEOUT), reason="TLS handshake timeout")
        else:
            log.debug("listener %s: TLS handshake with %s failed: %r", self.listener.name, slot.ip, error)
        slot.release()
        transport.close()

    def close(self) -> None:
        """Accept no more, and drop the handshakes still running (the listener is stopping)."""
        self.closed = True
        for transport in list(self.handshaking):
            transport.abort()
