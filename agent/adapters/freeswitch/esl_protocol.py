"""FreeSWITCH event-socket framing: bytes in, values out (and back), no I/O.

The wire format (mod_event_socket, reference/protocols.md §4): every frame is a block of
``Name: value`` lines ended by an empty line, then exactly ``Content-Length`` bytes of body when
that header is present. Frame types the agent meets:

* ``auth/request`` (no body), ``command/reply`` (``Reply-Text``, no body),
* ``api/response`` (the command's output as the body),
* ``text/event-plain``: the body is itself a block of URL-encoded ``Name: value`` lines ended by
  an empty line, or by ``Content-Length: N`` + an empty line + N bytes when the event has a body
  of its own (``BACKGROUND_JOB`` output, the XML CDR of ``hangup_complete_with_xml``),
* ``text/disconnect-notice`` and ``text/rude-rejection`` (a goodbye text as the body).

Errors come in two kinds. A :class:`FramingError` means the byte stream can no longer be
trusted (a wrong ``Content-Length``, a truncated frame): the connection must be dropped and
state resynchronised. A problem inside one event (a bad ``%`` escape in a header value) leaves
the framing intact: the event is still returned, with the problem named in
:attr:`Event.problems`, so the caller decides what to do with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import quote, unquote, unquote_to_bytes

AUTH_REQUEST = "auth/request"
COMMAND_REPLY = "command/reply"
API_RESPONSE = "api/response"
EVENT_PLAIN = "text/event-plain"
DISCONNECT_NOTICE = "text/disconnect-notice"
RUDE_REJECTION = "text/rude-rejection"
LOG_DATA = "log/data"

UNDEF = "_undef_"  # how FreeSWITCH writes an empty header value
MAX_HEADER_BLOCK_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
# switch_url_encode leaves these printable characters alone (plus letters and digits).
URL_SAFE = "!$'()*,-./_~"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DIGITS = re.compile(rb"[0-9]+")

GOODBYE = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"


class EslError(Exception):
    """Base class of event-socket errors."""


class FramingError(EslError):
    """The byte stream is not (or no longer) valid event-socket framing; drop the connection."""


class TruncatedFrame(FramingError):
    """The connection ended in the middle of a frame."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as read from the socket. Outer headers are never URL-encoded."""

    content_type: str
    headers: Mapping[str, str]
    body: bytes = b""
    offset: int = 0  # byte offset of the frame in the stream (for messages)

    @property
    def reply_text(self) -> str:
        return self.headers.get("Reply-Text", "")

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Event:
    """A decoded event (or any URL-encoded header block, such as ``uuid_dump`` output).

    An event carries about 250 headers and the agent reads a dozen, so values are looked up
    and URL-decoded on access (``get``), not all at parse time: parsing stays a handful of
    microseconds per event. A value with a bad ``%`` escape is returned undecoded and the
    problem is appended to :attr:`problems` (naming the header, the value and the column).
    A repeated header name yields its first value, as ``switch_event_get_header`` does.
    """

    __slots__ = ("_cache", "_text", "body", "problems", "received_at", "where")

    def __init__(self, text: str = "", body: str = "", *, where: str = "event") -> None:
        self._text = "\n" + text + "\n"  # every header is then "\nName: value\n"
        self._cache: dict[str, str | None] = {}
        self.body = body
        self.problems: list[str] = []
        self.where = where
        self.received_at = 0.0  # time.perf_counter() when the connection read it (0: not from a socket)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], body: str = "") -> Event:
        text = "\n".join(f"{name}: {url_encode(value)}" for name, value in headers.items())
        return cls(text, body)

    @property
    def name(self) -> str:
        return self.get("Event-Name")

    def get(self, name: str, default: str = "") -> str:
        if name in self._cache:
            cached = self._cache[name]
            return default if cached is None else cached
        text = self._text
        at = text.find("\n" + name + ": ")
        if at < 0:
            self._cache[name] = None
            return default
        start = at + len(name) + 3
        value = text[start:text.index("\n", start)]
        if "%" in value:
            value = _unquote_checked(name, value, self)
        elif value == UNDEF:
            value = ""
        self._cache[name] = value
        return value

    def __contains__(self, name: str) -> bool:
        return bool(self.get(name, "\0") != "\0")

    def pairs(self) -> list[tuple[str, str]]:
        """Every header in wire order, decoded (repeated names included)."""
        out = []
        for number, line in enumerate(self._text[1:-1].split("\n"), start=1):
            name, sep, value = line.partition(": ")
            if not sep or not name:
                self.problems.append(f"{self.where}: header line {number} {line[:60]!r} is not 'Name: value'")
                continue
            if "%" in value:
                value = _unquote_checked(name, value, self)
            elif value == UNDEF:
                value = ""
            out.append((name, value))
        return out

    @property
    def headers(self) -> _HeaderView:
        """A read-only mapping over the headers (lookups stay lazy)."""
        return _HeaderView(self)


class _HeaderView(Mapping[str, str]):
    """What greenswitch's dispatcher and handlers expect from ``event.headers``."""

    __slots__ = ("_event",)

    def __init__(self, event: Event) -> None:
        self._event = event

    def __getitem__(self, name: str) -> str:
        marker = "\0"
        value = self._event.get(name, marker)
        if value == marker:
            raise KeyError(name)
        return value

    def get(self, name: str, default: Any = None) -> Any:
        marker = "\0"
        value = self._event.get(name, marker)
        return default if value == marker else value

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for name, _ in self._event.pairs():
            if name not in seen:
                seen.add(name)
                yield name

    def __len__(self) -> int:
        return sum(1 for _ in self)


# ------------------------------------------------------------------------------------ framing


class FrameReader:
    """Incremental frame parser: :meth:`feed` it bytes as they arrive, get complete frames.

    After a :class:`FramingError` the reader is poisoned (every later call raises): the stream
    position is unknown, only a new connection can recover.
    """

    def __init__(self, *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.max_body_bytes = max_body_bytes
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0]
        self._frames = 0
        self._pending: tuple[str, dict[str, str], int, int] | None = None  # type, headers, body start, length
        self._error: FramingError | None = None

    @property
    def frames_read(self) -> int:
        return self._frames

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        self._buf += data
        frames: list[Frame] = []
        try:
            pos = self._parse(frames)
        except FramingError as exc:
            self._error = exc
            raise
        if pos:
            del self._buf[:pos]
            self._offset += pos
            if self._pending is not None:
                kind, headers, start, length = self._pending
                self._pending = (kind, headers, start - pos, length)
        return frames

    def close(self) -> None:
        """The connection ended: raise :class:`TruncatedFrame` if a frame was cut short."""
        if self._error is not None or not self._buf:
            return
        if self._pending is not None:
            kind, _, start, length = self._pending
            raise TruncatedFrame(
                f"connection closed in the middle of a {kind} frame at byte {self._offset}: "
                f"{len(self._buf) - start} of its {length} body bytes arrived")
        raise TruncatedFrame(f"connection closed in the middle of a frame's headers at byte {self._offset}: "
                             f"{len(self._buf)} bytes without the closing empty line")

    def _parse(self, frames: list[Frame]) -> int:
        buf = self._buf
        pos = 0
        while True:
            if self._pending is None:
                end = buf.find(b"\n\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_HEADER_BLOCK_BYTES:
                        raise FramingError(f"frame #{self._frames + 1} at byte {self._offset + pos}: no empty line "
                                           f"within {MAX_HEADER_BLOCK_BYTES} bytes of headers")
                    return pos
                kind, headers, length = self._outer_headers(bytes(buf[pos:end]), self._offset + pos)
                self._pending = (kind, headers, end + 2, length)
            kind, headers, start, length = self._pending
            if len(buf) - start < length:
                return pos
            self._frames += 1
            frames.append(Frame(kind, headers, bytes(buf[start:start + length]), self._offset + pos))
            self._pending = None
            pos = start + length

    def _outer_headers(self, block: bytes, offset: int) -> tuple[str, dict[str, str], int]:
        where = f"frame #{self._frames + 1} at byte {offset}"
        if not block:
            raise FramingError(f"{where}: an empty line where a frame should start "
                               "(the previous frame's Content-Length is probably too small)")
        headers: dict[str, str] = {}
        for number, raw in enumerate(block.split(b"\n"), start=1):
            name, sep, value = raw.partition(b": ")
            if not sep or not name:
                shown = raw[:60].decode("utf-8", "replace")
                raise FramingError(f"{where}: header line {number} {shown!r} is not 'Name: value' "
                                   "(the previous frame's Content-Length is probably wrong)")
            headers[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        kind = headers.get("Content-Type")
        if kind is None:
            raise FramingError(f"{where}: no Content-Type header (headers: {', '.join(headers)})")
        raw_length = headers.get("Content-Length")
        if raw_length is None:
            return kind, headers, 0
        if not _DIGITS.fullmatch(raw_length.encode()):
            raise FramingError(f"{where}: Content-Length {raw_length!r} of a {kind} frame is not a byte count")
        length = int(raw_length)
        if length > self.max_body_bytes:
            raise FramingError(f"{where}: Content-Length {length} of a {kind} frame exceeds the "
                               f"{self.max_body_bytes}-byte limit")
        return kind, headers, length


# ------------------------------------------------------------------------------------ events


def parse_event(body: bytes, *, where: str = "event") -> Event:
    """Decode a ``text/event-plain`` body (or ``uuid_dump`` output) into an :class:`Event`.

    Raises :class:`FramingError` when the body's own structure contradicts its length (the
    outer ``Content-Length`` was wrong). Header-level problems (a line that is not
    ``Name: value``, raw non-ASCII bytes, bad ``%`` escapes) are reported in ``problems``.
    """
    sep = body.find(b"\n\n")
    if sep < 0:
        raise FramingError(f"{where}: {len(body)} bytes without the empty line that ends an event's "
                           "headers (its Content-Length is probably too small)")
    head = body[:sep]
    rest = body[sep + 2:]
    problems: list[str] = []
    if head.isascii():
        text = head.decode("ascii")
    else:
        problems.append(f"{where}: raw non-ASCII bytes in the headers (FreeSWITCH URL-encodes every byte "
                        "above 0x7E); replaced")
        text = head.decode("utf-8", "replace")
    inner_at = text.rfind("\nContent-Length: ")
    inner = None
    if inner_at >= 0 or text.startswith("Content-Length: "):
        line_start = inner_at + 1 if inner_at >= 0 else 0
        inner = text[line_start + len("Content-Length: "):]
        if "\n" in inner:  # not the last header: an ordinary (odd) header, not a body length
            inner = None
        else:
            text = text[:max(inner_at, 0)]
    if inner is None:
        if rest:
            raise FramingError(f"{where}: {len(rest)} unexpected bytes after the event's headers "
                               "(its Content-Length is probably too large)")
        event = Event(text, where=where)
    else:
        if not inner.isdigit() or int(inner) != len(rest):
            raise FramingError(f"{where}: the event declares a {inner!r}-byte body but {len(rest)} bytes "
                               "follow (the frame's Content-Length is wrong)")
        event = Event(text, rest.decode("utf-8", "replace"), where=where)
    event.problems.extend(problems)
    return event


def _unquote_checked(name: str, value: str, event: Event) -> str:
    bad = _BAD_ESCAPE.search(value)
    if bad is not None:
        event.problems.append(f"{event.where}: header {name} value {value[:80]!r} has a bad URL escape "
                              f"{value[bad.start():bad.start() + 3]!r} at column {bad.start() + 1}; kept undecoded")
        return value
    decoded = unquote(value)
    if "\ufffd" in decoded:
        try:
            unquote_to_bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            event.problems.append(f"{event.where}: header {name} decodes to bytes that are not UTF-8 "
                                  f"(byte {exc.start}); undecodable bytes replaced")
    return decoded


# ------------------------------------------------------------------------------------ encoding


@lru_cache(maxsize=16_384)  # most values repeat (addresses, flags, names, uuids of live calls)
def url_encode(value: str) -> str:
    """Encode a header value exactly as ``switch_url_encode`` does (an empty value is ``_undef_``)."""
    if not value:
        return UNDEF
    return quote(value, safe=URL_SAFE)


def encode_event_body(headers: Iterable[tuple[str, str]], body: str | bytes = b"") -> bytes:
    """The body of a ``text/event-plain`` frame (``switch_event_serialize`` with encoding)."""
    text = "".join(f"{name}: {url_encode(value)}\n" for name, value in headers).encode()
    payload = body.encode() if isinstance(body, str) else body
    if payload:
        return text + b"Content-Length: %d\n\n" % len(payload) + payload
    return text + b"\n"


def encode_event(headers: Iterable[tuple[str, str]], body: str | bytes = b"") -> bytes:
    """A whole event frame, outer headers in FreeSWITCH's order (length first)."""
    inner = encode_event_body(headers, body)
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(inner) + inner


def encode_api_response(body: str | bytes) -> bytes:
    payload = body.encode() if isinstance(body, str) else body
    return b"Content-Type: api/response\nContent-Length: %d\n\n" % len(payload) + payload


def encode_command_reply(reply_text: str, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    lines = [f"Content-Type: command/reply\nReply-Text: {reply_text}\n"]
    lines += [f"{name}: {value}\n" for name, value in extra]
    return ("".join(lines) + "\n").encode()


def encode_auth_request() -> bytes:
    return b"Content-Type: auth/request\n\n"


def encode_disconnect_notice() -> bytes:
    return b"Content-Type: text/disconnect-notice\nContent-Length: %d\n\n" % len(GOODBYE) + GOODBYE


def encode_command(command: str) -> bytes:
    """A client command: one line, ended by an empty line. A newline inside a command would
    smuggle a second command into the socket, so it is refused."""
    if "\n" in command or "\r" in command:
        raise ValueError(f"an event-socket command must be one line: {command[:80]!r}")
    return command.encode() + b"\n\n"
