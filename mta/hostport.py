"""Network addresses as the configuration writes them: ``host:port``.

Owns one parser, shared by the configuration's validators and by the code
that opens sockets on configured addresses (listeners, the drain endpoint,
the identity probe, ``mta drain --to``).  A leaf: it imports nothing of the
project.

Failure: ``ValueError`` whose message quotes the value and says what is
wrong with it; the configuration reports it under the key that held it.
"""

from __future__ import annotations


def parse_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or (with a default) a bare host."""
    text = str(value).strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r}: unclosed '[' in address")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected ':port' after ']'")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""  # a bare name, or a bare IPv6 address
    if not host:
        raise ValueError(f"{value!r}: missing host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{value!r}: missing ':port'")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r}: port must be a number from 1 to 65535")
    return host, int(port_text)
