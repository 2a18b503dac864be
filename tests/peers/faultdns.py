"""A DNS server of the tests' own that answers, or misbehaves, per name and type.

unbound (tests.peers.dns) answers correctly; this one (dnspython messages
over plain sockets) is for what real authoritative servers get wrong.  Per
(name, type) it serves records, or a fault: REFUSED, SERVFAIL, NXDOMAIN, no
reply at all (the client times out) or TC over UDP with the full answer
over TCP.  A name may be a CNAME, followed within the answer as a recursive
resolver would (at most ``MAX_CHAIN`` links); an answer too large for the
client's UDP payload (512 octets without EDNS) is sent truncated over UDP,
as any server does.  A name nothing was said about is NXDOMAIN; a name with
data, but not of the asked type, is NOERROR with no data.

Owns: one UDP and one TCP socket on ``host`` (a 127.0.0.0/8 address) and
one port free for both, the thread serving each, a thread per open TCP
connection (at most ``MAX_TCP_CLIENTS``, each closed after
``TCP_IDLE`` seconds of silence), and ``queries``, the log of every
question received.

How it fails: ``start`` raises RuntimeError when no port is free for both
protocols; ``stop`` closes the sockets, joins every thread it started
(bounded) and raises RuntimeError if a thread is still alive or a request
could not be handled (the first such error is kept in ``errors``).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

MAX_CHAIN = 8
MAX_TCP_CLIENTS = 64
TCP_IDLE = 10.0
POLL = 0.1  # how often the serving loops look at the stop flag
ANY = "*"  # a fault for every type of a name


class Fault(Enum):
    REFUSED = "refused"
    SERVFAIL = "servfail"
    NXDOMAIN = "nxdomain"
    TIMEOUT = "timeout"  # no reply, over UDP or TCP
    TRUNCATE = "truncate"  # TC and no records over UDP; the full answer over TCP


@dataclass(frozen=True)
class Query:
    name: str  # lower case, no final dot
    rdtype: str  # "A", "MX", ...
    transport: str  # "udp" or "tcp"


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text.strip().lower())


def _key(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


class FaultDns:
    """Answers on ``host``:``port`` over UDP and TCP from the rules it is given."""

    def __init__(self, host: str = "127.0.0.53") -> None:
        if not host.startswith("127."):
            raise ValueError(f"{host}: the fault DNS server runs on loopback (127.0.0.0/8) only")
        self.host = host
        self.port = 0
        self.queries: list[Query] = []
        self.errors: list[BaseException] = []
        self._records: dict[tuple[str, str], list[str]] = {}
        self._ttl: dict[tuple[str, str], int] = {}
        self._cnames: dict[str, str] = {}
        self._faults: dict[tuple[str, str], Fault] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._servers: list[threading.Thread] = []  # the UDP loop and the TCP accept loop
        self._threads: list[threading.Thread] = []  # one per TCP client; only the accept loop changes it

    # -- the rules -------------------------------------------------------

    def add(self, name: str, rdtype: str, *rdata: str, ttl: int = 60) -> None:
        """Serve these records (text form: ``"10 mx.example."``, ``"192.0.2.1"``) for ``name``/``rdtype``."""
        key = (_key(_name(name)), rdtype.upper())
        dns.rdatatype.from_text(key[1])  # an unknown type fails here, not at query time
        with self._lock:
            self._records.setdefault(key, []).extend(rdata)
            self._ttl[key] = ttl

    def cname(self, name: str, target: str) -> None:
        with self._lock:
            self._cnames[_key(_name(name))] = target

    def fault(self, name: str, rdtype: str, fault: Fault) -> None:
        """Misbehave for ``name``/``rdtype`` (``ANY``: for every type of the name)."""
        with self._lock:
            self._faults[(_key(_name(name)), rdtype.upper())] = fault

    def asked(self, rdtype: str | None = None, transport: str | None = None) -> list[Query]:
        """The questions received so far, of one type and over one transport if given."""
        with self._lock:
            return [q for q in self.queries
                    if (rdtype is None or q.rdtype == rdtype) and (transport is None or q.transport == transport)]

    # -- answering -------------------------------------------------------

    def _exists(self, key: str) -> bool:
        return (key in self._cnames or any(name == key for name, _ in self._records)
                or any(name == key for name, _ in self._faults))

    def _answer(self, request: dns.message.Message, transport: str) -> dns.message.Message | None:
        """The reply to ``request``; None for no reply at all."""
        response = dns.message.make_response(request)
        response.flags |= dns.flags.AA
        if len(request.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = request.question[0]
        qtype = dns.rdatatype.to_text(question.rdtype)
        name = question.name
        with self._lock:
            self.queries.append(Query(_key(name), qtype, transport))
            for _ in range(MAX_CHAIN + 1):
                key = _key(name)
                fault = self._faults.get((key, qtype)) or self._faults.get((key, ANY))
                if fault is Fault.TIMEOUT:
                    return None
                if fault in (Fault.REFUSED, Fault.SERVFAIL, Fault.NXDOMAIN):
                    response.set_rcode({Fault.REFUSED: dns.rcode.REFUSED, Fault.SERVFAIL: dns.rcode.SERVFAIL,
                                        Fault.NXDOMAIN: dns.rcode.NXDOMAIN}[fault])
                    return response
                if fault is Fault.TRUNCATE and transport == "udp":
                    del response.answer[:]
                    response.flags |= dns.flags.TC
                    return response
                target = self._cnames.get(key)
                if target is None or qtype == "CNAME":
                    break
                response.answer.append(dns.rrset.from_text_list(name, 60, dns.rdataclass.IN, "CNAME", [target],
                                                                origin=dns.name.root, relativize=False))
                name = _name(target)
            else:
                response.set_rcode(dns.rcode.SERVFAIL)  # a chain longer than a resolver would follow
                return response
            key = _key(name)
            records = self._records.get((key, qtype))
            if records:
                response.answer.append(dns.rrset.from_text_list(name, self._ttl[(key, qtype)], dns.rdataclass.IN,
                                                                qtype, records, origin=dns.name.root,
                                                                relativize=False))
            elif not self._exists(key):
                response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    def _wire(self, request: dns.message.Message, response: dns.message.Message, limit: int) -> bytes:
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # What every server does: TC and nothing else, the client asks again over TCP.
            del response.answer[:], response.authority[:], response.additional[:]
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    # -- serving ---------------------------------------------------------

    def _serve_udp(self) -> None:
        assert self._udp is not None
        while not self._stop.is_set():
            try:
                data, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            try:
                request = dns.message.from_wire(data)
                response = self._answer(request, "udp")
                if response is not None:
                    limit = max(512, request.payload) if request.edns >= 0 else 512
                    self._udp.sendto(self._wire(request, response, limit), peer)
            except Exception as exc:  # noqa: BLE001 - kept for stop() to raise; the loop serves on
                self.errors.append(exc)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._threads = [t for t in self._threads if t.is_alive()]
            if len(self._threads) >= MAX_TCP_CLIENTS:
                conn.close()  # bounded: a flood of connections is refused, not served
                continue
            thread = threading.Thread(target=self._tcp_client, args=(conn,), name="faultdns-tcp", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _read(self, conn: socket.socket, size: int) -> bytes | None:
        """Exactly ``size`` octets; None when the client closed, went silent or we stop."""
        data = b""
        silent_since = time.monotonic()
        while len(data) < size:
            if self._stop.is_set() or time.monotonic() - silent_since > TCP_IDLE:
                return None
            try:
                chunk = conn.recv(size - len(data))
            except TimeoutError:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
            silent_since = time.monotonic()
        return data

    def _tcp_client(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(POLL)
            while True:
                head = self._read(conn, 2)
                if head is None:
                    return
                body = self._read(conn, struct.unpack("!H", head)[0])
                if body is None:
                    return
                try:
                    request = dns.message.from_wire(body)
                    response = self._answer(request, "tcp")
                    if response is not None:
                        wire = self._wire(request, response, 65535)
                        conn.sendall(struct.pack("!H", len(wire)) + wire)
                except Exception as exc:  # noqa: BLE001 - kept for stop() to raise
                    self.errors.append(exc)
                    return

    # -- lifetime --------------------------------------------------------

    def start(self) -> None:
        for _ in range(50):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((self.host, 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind((self.host, port))
            except OSError:
                tcp.close()
                udp.close()
                continue
            break
        else:
            raise RuntimeError(f"no port free for both UDP and TCP on {self.host}")
        tcp.listen(MAX_TCP_CLIENTS)
        tcp.settimeout(POLL)
        udp.settimeout(POLL)
        self._tcp, self._udp, self.port = tcp, udp, port
        self._stop.clear()
        self._threads = []
        self._servers = [threading.Thread(target=self._serve_udp, name="faultdns-udp", daemon=True),
                         threading.Thread(target=self._serve_tcp, name="faultdns-tcp-accept", daemon=True)]
        for thread in self._servers:
            thread.start()

    def stop(self, *, check: bool = True) -> None:
        """Stop serving; with ``check``, raise for stuck threads and requests that could not be handled."""
        self._stop.set()
        deadline = time.monotonic() + 5.0
        for thread in self._servers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        # The accept loop has ended (or is stuck, reported below): the client list no longer changes.
        threads = [*self._servers, *self._threads]
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None
        alive = [t.name for t in threads if t.is_alive()]
        if not check:
            return
        if alive:
            raise RuntimeError(f"fault DNS threads still running after stop: {alive}")
        if self.errors:
            raise RuntimeError(f"fault DNS could not handle a request: {self.errors[0]!r}") from self.errors[0]

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def __enter__(self) -> FaultDns:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # A failure of the block is the news; the server's own problems must not hide it.
        self.stop(check=exc is None)
