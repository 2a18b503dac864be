"""One outbound SMTP connection (aiosmtplib) and the transactions on it.

``Connector.open`` finds a server for a next hop — MX hosts in order, each
of their addresses, skipping hosts that do not answer or resolve, within the
per-attempt bounds of ``ClientSettings`` (``mta.delivery.mx``) — binds the configured
source address, says EHLO with our host name and upgrades to TLS: always for
smart hosts that ask for it (verified against the configured roots),
opportunistically for MX hosts (unverified, and in plain text again if the
handshake fails, as RFC 7435 allows).  ``Connection.send`` runs one mail
transaction and maps every reply to an ``Outcome`` per recipient.  The
courier (``mta.delivery.courier``) decides which connection a message uses.

Failure: ``ConnectFailed`` carrying the outcome for every recipient of the
hop; ``send`` never raises for remote trouble, it reports it, and marks the
connection unusable when the session is broken.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import aiosmtplib

from mta import replies
from mta.delivery import result
from mta.delivery.mx import LookupFailed, MxResolver
from mta.delivery.result import Kind, Outcome, Tls
from mta.delivery.route import NextHop
from mta.dsnrequest import MailRequest, RecipientRequest
from mta.message import has_bare_line_endings

log = logging.getLogger(__name__)


class StaleConnection(Exception):
    """A kept-open connection turned out to be closed before this transaction
    began: nothing was sent, so the caller may simply use a new connection."""


class ConnectFailed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome


@dataclass(frozen=True)
class ClientSettings:
    helo_name: str
    port: int = 25
    source_address: str | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 120.0
    # Per attempt, so a domain with hundreds of MX records or names that
    # never resolve cannot hold a delivery slot for minutes.
    max_mx_hosts: int = 10  # MX hosts looked up, best first
    max_mx_addresses: int = 20  # addresses tried
    dns_attempt_timeout: float = 30.0  # all the DNS lookups of one attempt together
    # Direct delivery connects only to global addresses and these: an MX that
    # points at loopback, a private range or a metadata address (169.254.169.254)
    # must not make the MTA a way into the cluster.  Smart hosts are exempt.
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


def may_connect(address: str, allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether direct delivery may connect to ``address``: a global one, or one ``allowed``."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return (ip.is_global and not ip.is_multicast) or any(ip in network for network in allowed)


def _reply_text(exc: aiosmtplib.SMTPResponseException) -> str:
    return str(replies.from_server(exc.code, exc.message))


def read_credentials(path: Path) -> tuple[str, str]:
    """``user:password`` on the first line (a Secret mounted as a file)."""
    lines = path.read_text().splitlines()
    line = lines[0] if lines else ""
    user, sep, password = line.partition(":")
    if not sep or not user:
        raise ValueError(f"{path}: expected 'username:password' on the first line")
    return user, password


@functools.lru_cache(maxsize=32)
def _tls_context(verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    """One context per (verify, roots): loading the CA bundle costs milliseconds."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Connection:
    """An open, greeted SMTP session with one server."""

    def __init__(self, smtp: aiosmtplib.SMTP, mx_host: str | None, mx_ip: str | None) -> None:
        self.smtp = smtp
        self.mx_host = mx_host
        self.mx_ip = mx_ip
        self.usable = True
        self.transactions = 0

    @property
    def remote(self) -> str:
        """``mx.example.com[192.0.2.1]``, ``[192.0.2.1]`` for an address literal, a relay's ``host:port``."""
        return result.remote_name(self.mx_host, self.mx_ip) or "?"

    @property
    def tls(self) -> bool:
        return self.tls_info() is not None

    def tls_info(self) -> Tls | None:
        """The session's TLS version and cipher, or None (plain text, or already closed)."""
        if not self.smtp.is_connected:
            return None
        ssl_object = self.smtp.get_transport_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return Tls(ssl_object.version() or "", cipher[0] if cipher else None)

    def supports(self, extension: str) -> bool:
        return bool(self.smtp.supports_extension(extension))

    def size_limit(self) -> int | None:
        """The SIZE the server announced (RFC 1870), or None for none or 0 (no limit)."""
        value = self.smtp.esmtp_extensions.get("size", "")
        return int(value) if value.strip().isdigit() and int(value) > 0 else None

    def outcome(self, kind: Kind, code: int, enhanced: str, text: str) -> Outcome:
        """An outcome of our own wording about this server."""
        return Outcome(kind, replies.Reply(code, enhanced, text), self.mx_host, self.mx_ip, self.tls_info())

    def _answered(self, exc: aiosmtplib.SMTPResponseException) -> Outcome:
        return result.from_server(exc.code, exc.message, self.mx_host, self.mx_ip, self.tls_info())

    async def send(
        self, sender: str, recipients: Sequence[str], data: bytes, *, smtputf8: bool = False, eight_bit: bool = False,
        dsn: MailRequest | None = None, recipient_dsn: Mapping[str, RecipientRequest] | None = None,
    ) -> dict[str, Outcome]:
        smtp, remote = self.smtp, self.remote
        if not smtp.is_connected:
            self.usable = False
            raise StaleConnection(f"{remote} closed the session")
        tls = self.tls_info()
        outcomes: dict[str, Outcome] = {}
        options: list[str] = []
        encoding = "ascii"
        if smtputf8:
            if not smtp.supports_extension("smtputf8"):
                outcome = self.outcome(Kind.PERMANENT, 553, "5.6.7",
                                       f"the message needs SMTPUTF8, which {remote} does not offer")
                return dict.fromkeys(recipients, outcome)
            options.append("SMTPUTF8")
            encoding = "utf-8"
        if eight_bit and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if smtp.supports_extension("size"):
            limit = self.size_limit()
            if limit and len(data) > limit:
                outcome = self.outcome(Kind.PERMANENT, 552, "5.3.4",
                                       f"the message has {len(data)} octets; {remote} accepts at most {limit}")
                return dict.fromkeys(recipients, outcome)
            options.append(f"SIZE={len(data)}")
        # A server without DSN gets none of it (RFC 3461 §5.2.2): we notify for it.
        passes_dsn = smtp.supports_extension("dsn")
        if passes_dsn and dsn is not None:
            options += dsn.mail_options()
        self.transactions += 1
        try:
            try:
                await smtp.mail(sender, options=options, encoding=encoding)
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                if self.transactions > 1:
                    # The server closed the idle session (a restart, an idle timeout).
                    self.usable = False
                    raise StaleConnection(str(exc)) from None
                raise
            except aiosmtplib.SMTPResponseException as exc:
                outcome = self._answered(exc)
                await self._reset_after(exc.code)
                return dict.fromkeys(recipients, outcome)
            accepted = []
            for rcpt in recipients:
                request = recipient_dsn.get(rcpt) if passes_dsn and recipient_dsn else None
                try:
                    await smtp.rcpt(rcpt, options=request.rcpt_options() if request else None, encoding=encoding)
                    accepted.append(rcpt)
                except aiosmtplib.SMTPResponseException as exc:
                    outcomes[rcpt] = self._answered(exc)
                    if exc.code == 421:
                        raise
            if not accepted:
                await self._reset_after(0)
                return outcomes
            try:
                response = await self._data(data)
            except aiosmtplib.SMTPResponseException as exc:
                outcome = self._answered(exc)
                if exc.code == 421:
                    self.usable = False
                outcomes.update(dict.fromkeys(accepted, outcome))
                return outcomes
            done = result.from_server(response.code, response.message, self.mx_host, self.mx_ip, tls)
            outcomes.update(dict.fromkeys(accepted, replace(done, dsn_passed=passes_dsn)))
            return outcomes
        except (aiosmtplib.SMTPException, OSError) as exc:
            # The session broke (disconnect, timeout, 421): everything not yet
            # answered for is undecided and will be tried again.
            self.usable = False
            reply = _reply_text(exc) if isinstance(exc, aiosmtplib.SMTPResponseException) else f"{exc}"
            outcome = Outcome(Kind.TRANSIENT, replies.Reply(451, "4.4.2", f"connection to {remote} lost: {reply}"),
                              self.mx_host, self.mx_ip, tls)
            for rcpt in recipients:
                outcomes.setdefault(rcpt, outcome)
            return outcomes

    async def _data(self, data: bytes) -> aiosmtplib.SMTPResponse:
        """DATA and the content.

        Messages leave the spool with CRLF line endings (``mta.receive``
        normalises them), so only the leading dots need doubling (RFC 5321
        §4.5.2), a bytes replace; aiosmtplib's ``data`` runs two regular
        expressions over every message, a tenth of the delivery path's time.
        """
        smtp = self.smtp
        if has_bare_line_endings(data):
            return await smtp.data(data)  # aiosmtplib fixes them
        start = await smtp.execute_command(b"DATA")
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        if data[:1] == b"." or b"\n." in data:
            data = (b"\n" + data).replace(b"\n.", b"\n..")[1:]
        if data and not data.endswith(b"\r\n"):
            data += b"\r\n"
        # No await between the write and read_response: the reply cannot
        # arrive before aiosmtplib expects it.
        smtp.protocol.write(data + b".\r\n")
        response = await smtp.protocol.read_response(timeout=smtp.timeout)
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    async def _reset_after(self, code: int) -> None:
        if code == 421:
            self.usable = False
            return
        try:
            await self.smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            self.usable = False

    async def close(self) -> None:
        try:
            if self.usable and self.smtp.is_connected:
                await self.smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            self.smtp.close()


class Connector:
    """Opens connections to next hops; the network pieces are injectable."""

    def __init__(self, settings: ClientSettings, mx: MxResolver) -> None:
        self.settings = settings
        self.mx = mx

    def _families(self) -> tuple[int, ...]:
        source = self.settings.source_address
        if source is None:
            return (4, 6)
        return (6,) if ":" in source else (4,)

    async def open(self, hop: NextHop) -> Connection:
        if hop.kind == "relay":
            return await self._open_relay(hop)
        return await self._open_mx(hop.name)

    async def _open_mx(self, domain: str) -> Connection:
        """The first of the domain's servers that takes a session; a host or a
        family whose lookup fails is skipped, only no address at all fails the lookup."""
        settings = self.settings
        last: Outcome | None = None
        refused = connectable = 0
        servers = self.mx.servers(domain, self._families(), max_hosts=settings.max_mx_hosts,
                                  max_addresses=settings.max_mx_addresses, timeout=settings.dns_attempt_timeout)
        try:
            async with contextlib.aclosing(servers):
                async for server in servers:
                    name = server.host.name
                    mx_host = None if name.startswith("[") else name
                    if not may_connect(server.address, settings.allowed_networks):
                        refused += 1
                        log.warning("delivery to %s: %s[%s] is not a public address and not in "
                                    "delivery.allowed_networks; not connecting", domain, name, server.address)
                        continue
                    connectable += 1
                    try:
                        return await self._connect(server.address, settings.port, mx_host, server.address,
                                                   tls="opportunistic", server_name=name)
                    except ConnectFailed as exc:
                        last = exc.outcome
                        log.info("delivery to %s: %s", exc.outcome.remote, exc.outcome.reply)
        except LookupFailed as exc:
            raise ConnectFailed(Outcome(Kind.PERMANENT if exc.permanent else Kind.TRANSIENT, exc.reply)) from None
        if refused and not connectable:
            raise ConnectFailed(result.permanent(
                554, "5.4.4", f"the mail exchangers of {domain} have only addresses that direct delivery may not "
                f"use (loopback, private or link-local; see delivery.allowed_networks)"))
        raise ConnectFailed(last or result.transient(451, "4.4.1", f"no mail exchanger of {domain} answered"))

    async def _open_relay(self, hop: NextHop) -> Connection:
        route = hop.route
        assert route is not None
        host, port = route.relay_host_port
        connection = await self._connect(host, port, hop.name, None, tls=route.tls, server_name=host,
                                         verify=route.tls_verify, ca_file=route.ca_file)
        if route.auth_file is not None:
            if not connection.tls and route.tls != "none":
                await connection.close()
                raise ConnectFailed(result.transient(
                    454, "4.7.0", f"smart host {hop.name} offered no TLS; credentials not sent"))
            try:
                user, password = read_credentials(route.auth_file)
            except (OSError, ValueError) as exc:
                await connection.close()
                raise ConnectFailed(result.transient(451, "4.3.5", f"smart host credentials unusable: {exc}")) \
                    from None
            try:
                await connection.smtp.login(user, password)
            except aiosmtplib.SMTPException as exc:
                await connection.close()
                detail = _reply_text(exc) if isinstance(exc, aiosmtplib.SMTPResponseException) else str(exc)
                raise ConnectFailed(connection.outcome(
                    Kind.TRANSIENT, 454, "4.7.0", f"authentication to smart host {hop.name} failed: {detail}")) \
                    from None
        return connection

    async def _connect(self, address: str, port: int, mx_host: str | None, mx_ip: str | None, *, tls: str,
                       server_name: str, verify: bool = False, ca_file: Path | None = None,
                       plaintext_retry: bool = True) -> Connection:
        settings = self.settings
        remote = result.remote_name(mx_host, mx_ip)

        def failed(code: int, enhanced: str, text: str) -> ConnectFailed:
            return ConnectFailed(Outcome(Kind.TRANSIENT, replies.Reply(code, enhanced, text), mx_host, mx_ip))

        context = _tls_context(verify, ca_file)
        smtp = aiosmtplib.SMTP(
            hostname=address,
            port=port,
            local_hostname=settings.helo_name,
            source_address=(settings.source_address, 0) if settings.source_address else None,
            timeout=settings.command_timeout,
            use_tls=tls == "implicit",
            start_tls=False,
            tls_context=context if tls == "implicit" else None,
            validate_certs=verify,
        )
        try:
            # Implicit TLS (relays only) checks the certificate against ``address``, the relay's name.
            await smtp.connect(timeout=settings.connect_timeout)
            await smtp.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise failed(451, "4.4.0", f"{remote} refused the session: {_reply_text(exc)}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise failed(451, "4.4.1", f"cannot connect to {remote}: {exc}") from None
        if tls in ("starttls", "opportunistic"):
            if smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(server_hostname=server_name, tls_context=context, validate_certs=verify)
                    # STARTTLS discards what the server said before (RFC 3207 §4.2): ask
                    # again, or MAIL would go out without SIZE, BODY and SMTPUTF8.
                    await smtp.ehlo()
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
                    smtp.close()
                    if tls == "opportunistic" and plaintext_retry:
                        log.warning("STARTTLS with %s failed (%s); retrying in plain text", remote, exc)
                        return await self._connect(address, port, mx_host, mx_ip, tls="none",
                                                   server_name=server_name, plaintext_retry=False)
                    raise failed(454, "4.7.5", f"TLS with {remote} failed: {exc}") from None
            elif tls == "starttls":
                await Connection(smtp, mx_host, mx_ip).close()
                raise failed(454, "4.7.4", f"{remote} does not offer STARTTLS")
        return Connection(smtp, mx_host, mx_ip)
