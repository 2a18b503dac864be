"""The DATA phase read in blocks instead of one line at a time.

aiosmtpd reads message content with one ``readuntil(b"\\r\\n")`` and a few
Python statements per line, which dominates the cost of large messages.
``read_content`` asks the stream for everything up to the next ``.\\r\\n``
(the only place the end of data can be), so a message costs a handful of
calls however many lines it has; it then removes the transparency dots and
checks line lengths with one regular expression (a line may end with CR,
LF or CRLF: the content policy, ``mta.content``, repairs them later).

The rules are aiosmtpd's and RFC 5321's: lines end with CRLF, the content
ends at a line holding a single dot (§4.1.1.4), a leading dot is removed
from every line (§4.5.2), and a message over the size limit or with a line
over the line limit is read to its end and then refused (§4.2.5).

``DataCommand`` is aiosmtpd's DATA command built on it, for the session
(``mta.smtp.server``); its refusals are catalogue replies (``mta.replies``).

Failure: a closed connection raises ``asyncio.IncompleteReadError`` (the
command turns it into a reset, nothing kept); limits are reported in
``Content.problem`` and never raise.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiosmtpd.smtp import MISSING, SMTP

from mta import replies
from mta.content import line_over

END = b".\r\n"
TOO_LONG = "line"
TOO_MUCH = "size"
BUSY = "busy"  # the process holds limits.max_data_in_flight already


class InFlight:
    """Bytes of DATA held in memory by the sessions of one process, against one bound.

    One per process and bound (``for_process``): every listener's sessions
    draw on it, so 20 clients sending 24 MiB at once cannot take 920 MB.
    """

    _per_process: dict[int, InFlight] = {}

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @classmethod
    def for_process(cls, limit: int) -> InFlight:
        return cls._per_process.setdefault(limit, cls(limit))

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


@dataclass
class Content:
    data: bytes  # without the final dot line, dots removed; empty when refused
    problem: str | None = None  # TOO_LONG, TOO_MUCH or BUSY
    held: int = 0  # bytes taken from the InFlight bound: given back once the message is stored


async def _next_block(reader: asyncio.StreamReader) -> bytes:
    """Bytes up to and including the next ``.\\r\\n``, or a bounded block without it."""
    try:
        return await reader.readuntil(END)
    except asyncio.LimitOverrunError as exc:
        # More buffered than the stream's limit: take what was scanned (at
        # least one byte) and look again, so memory stays bounded.
        return await reader.readexactly(max(exc.consumed, 1))


def _ends_content(tail: bytes, block: bytes) -> bool:
    """Whether ``block`` ends with the dot line: ``.\r\n`` at the start of a line."""
    if not block.endswith(END):
        return False
    before = block[-5:-3] if len(block) >= 5 else (tail + block[:-3])[-2:]
    return before == b"\r\n"


async def read_content(reader: asyncio.StreamReader, size_limit: int | None, line_limit: int,
                       in_flight: InFlight | None = None) -> Content:
    """Read one message's content after ``354``; ``line_limit`` includes the CRLF.

    Each block kept is taken from ``in_flight``; when it is spent, the rest
    is read and dropped (``BUSY``) and what was taken is given back.
    """
    blocks: list[bytes] = []
    total = 0
    held = 0
    tail = b"\r\n"  # the content starts at the beginning of a line
    problem: str | None = None
    while True:
        try:
            block = await _next_block(reader)
        except BaseException:
            if in_flight is not None:
                in_flight.give(held)  # the client went away: nothing of it is kept
            raise
        last = _ends_content(tail, block)
        if last:
            block = block[:-3]
        total += len(block)
        if problem is None and size_limit and total > size_limit:
            problem = TOO_MUCH
        elif problem is None and in_flight is not None and not in_flight.take(len(block)):
            problem = BUSY
        elif problem is None:
            held += len(block)
            blocks.append(block)
        if problem is not None and blocks:
            blocks.clear()  # refused anyway: keep memory flat while draining
            if in_flight is not None:
                in_flight.give(held)
            held = 0
        if last:
            break
        tail = (tail + block[-4:])[-4:]
    if problem is not None:
        return Content(b"", problem)
    raw = b"".join(blocks)
    blocks.clear()
    # Any line end counts: a message with bare LF ends is many lines, not one.
    if line_over(raw, line_limit - 2):
        if in_flight is not None:
            in_flight.give(held)
        return Content(b"", TOO_LONG)
    if raw[:1] == b"." or b"\r\n." in raw:
        # Transparency (RFC 5321 §4.5.2): drop the first dot of every line.
        raw = (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:]
    return Content(raw, held=held)


_REFUSALS = {TOO_LONG: replies.LINE_TOO_LONG, TOO_MUCH: replies.MESSAGE_TOO_BIG, BUSY: replies.DATA_BUSY}


class DataCommand(SMTP):
    """aiosmtpd's DATA command with the content read in blocks (``read_content``)."""

    data_in_flight_limit = 2**62  # limits.max_data_in_flight, set per listener

    async def _data(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        in_flight = InFlight.for_process(self.data_in_flight_limit)
        try:
            content = await read_content(self._reader, self.data_size_limit, self.line_length_limit, in_flight)
        except asyncio.IncompleteReadError:
            # The client went away in the middle: nothing of it is kept, and
            # aiosmtpd ends the session quietly on a reset.
            raise ConnectionResetError("connection closed during DATA") from None
        if content.problem is not None:
            self._set_post_data_state()
            await self.push(str(_REFUSALS[content.problem]))
            return
        held = content.held
        try:
            self.envelope.content = self.envelope.original_content = content.data
            del content
            status = await self._call_handler_hook("DATA")
        finally:
            # Stored or refused: the copies made on the way are gone with the handler's frame.
            self.envelope.content = self.envelope.original_content = None
            in_flight.give(held)
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)
