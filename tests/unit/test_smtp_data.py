"""The block-wise DATA reader against a line-by-line reading of RFC 5321."""

from __future__ import annotations

import asyncio

import pytest

from mta.smtp.data import BUSY, TOO_LONG, TOO_MUCH, Content, InFlight, read_content

LIMIT = 1001  # line limit with CRLF, as the listener sets it


def by_lines(wire: bytes) -> tuple[bytes, bytes]:
    """(content, what follows the dot line): the reference, one line at a time."""
    lines, rest = [], wire
    while True:
        line, _, rest = rest.partition(b"\r\n")
        if line == b".":
            return b"".join(lines), rest
        lines.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


async def feed_and_read(chunks: list[bytes], size_limit: int | None = None, limit: int = LIMIT,
                        stream_limit: int = LIMIT) -> tuple[Content, bytes]:
    reader = asyncio.StreamReader(limit=stream_limit)

    async def feed() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.ensure_future(feed())
    content = await asyncio.wait_for(read_content(reader, size_limit, limit), 5)
    await feeder
    return content, await reader.read()


def chunked(wire: bytes, size: int) -> list[bytes]:
    return [wire[i:i + size] for i in range(0, len(wire), size)]


MESSAGES = {
    "empty": b".\r\nQUIT\r\n",
    "one line": b"Subject: x\r\n.\r\nQUIT\r\n",
    "stuffed dots": b"..\r\n...x\r\n.y\r\nend.\r\n.\r\nMAIL FROM:<a@b.test>\r\n",
    "first line stuffed": b"..leading\r\nbody\r\n.\r\n",
    "lines ending in dots": b"a.\r\nb.\r\n.\r\n.\r\nRSET\r\n",  # ".\r\n" after "b." then the end
    "bare LF dot is not the end": b"a\n.\r\nb\r\n.\r\n",
    "bare CR dot is not the end": b"a\r.\r\nb\r\n.\r\n",
    "long": b"".join(b"line %d of a longer message body.\r\n" % i for i in range(3000)) + b".\r\nQUIT\r\n",
}


@pytest.mark.parametrize("name", MESSAGES)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 4096, 1 << 20])
def test_content_matches_line_by_line_reading_for_any_chunking(name: str, size: int) -> None:
    wire = MESSAGES[name]
    expected, after = by_lines(wire)
    content, rest = asyncio.run(feed_and_read(chunked(wire, size)))
    assert content.problem is None
    assert content.data == expected
    assert rest == after, "bytes after the dot line belong to the next command"


def test_message_over_the_size_limit_is_read_to_its_end_then_refused() -> None:
    wire = b"x" * 80 + b"\r\n"
    content, rest = asyncio.run(feed_and_read(chunked(wire * 100 + b".\r\nQUIT\r\n", 512), size_limit=4000))
    assert content == Content(b"", TOO_MUCH)
    assert rest == b"QUIT\r\n"


def test_message_at_the_size_limit_is_accepted() -> None:
    body = b"y" * 98 + b"\r\n"
    content, _ = asyncio.run(feed_and_read([body * 10 + b".\r\n"], size_limit=1000))
    assert content.problem is None and content.data == body * 10


def test_overlong_line_is_refused_after_the_end() -> None:
    wire = b"short\r\n" + b"z" * 2000 + b"\r\nafter\r\n.\r\nQUIT\r\n"
    content, rest = asyncio.run(feed_and_read(chunked(wire, 300)))
    assert content == Content(b"", TOO_LONG)
    assert rest == b"QUIT\r\n"


def test_line_exactly_at_the_limit_is_accepted() -> None:
    line = b"w" * (LIMIT - 2) + b"\r\n"
    content, _ = asyncio.run(feed_and_read([line, b".\r\n"]))
    assert content.problem is None and content.data == line


def test_connection_closed_before_the_end_raises() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(feed_and_read([b"Subject: cut\r\n", b"body\r\n"]))


def test_in_flight_bound_refuses_past_it_and_gives_back_what_it_took() -> None:
    bound = InFlight(10_000)
    held_elsewhere = 6_000
    assert bound.take(held_elsewhere)
    wire = b"Subject: s\r\n\r\n" + b"y" * 900 + b"\r\n" + (b"z" * 900 + b"\r\n") * 8 + b".\r\nQUIT\r\n"

    async def read() -> tuple[Content, bytes]:
        reader = asyncio.StreamReader(limit=LIMIT)
        reader.feed_data(wire)
        reader.feed_eof()
        return await read_content(reader, None, LIMIT, bound), await reader.read()

    content, after = asyncio.run(read())
    assert (content.problem, after) == (BUSY, b"QUIT\r\n")  # read to its end, nothing kept
    assert bound.held == held_elsewhere
    bound.give(held_elsewhere)
    content, _ = asyncio.run(read())
    assert content.problem is None and content.held == len(content.data) and bound.held == content.held
