"""AMI framing (pure: bytes in, messages out; no sockets, no clock).

What Asterisk writes (reference/protocols.md §2.1, captures/asterisk/ami-*.txt): a banner line
``Asterisk Call Manager/9.0.0\\r\\n`` with no blank line after it, then messages of
``Key: Value\\r\\n`` lines, each ended by an empty line. Keys repeat (``ChanVariable``,
``Variable``); the first value is what ``get`` returns, every value is kept in ``fields``.

Defensive choices, because a broken or hostile peer must never wedge the client:
* a bare ``\\n`` line end is accepted as well as ``\\r\\n``;
* a line without ``": "`` is garbage: it is skipped and reported in ``problems``;
* bytes that are not UTF-8 are replaced (the problem is reported once per message);
* a message that grows past ``max_message_bytes`` without a blank line raises
  ``AmiFramingError``: the client drops the connection and resynchronises.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

BANNER_PREFIX = "Asterisk Call Manager/"
MAX_MESSAGE_BYTES = 256 * 1024
_END = re.compile(rb"\r?\n\r?\n")
_UNSAFE_VALUE = re.compile(r"[\r\n]")


class AmiFramingError(Exception):
    """The byte stream cannot be framed into AMI messages (the connection must be reset)."""


class UnsafeValue(ValueError):
    """A value that cannot be put in an AMI action (a line break would inject a header)."""


class AmiMessage:
    """One AMI message: an event (``Event:``), a response (``Response:``) or garbage."""

    __slots__ = ("fields", "headers", "problems")

    def __init__(self, fields: list[tuple[str, str]], problems: list[str] | None = None) -> None:
        self.fields = fields
        self.headers: dict[str, str] = {}
        for key, value in fields:
            self.headers.setdefault(key, value)
        self.problems = problems or []

    def get(self, key: str, default: str = "") -> str:
        return self.headers.get(key, default)

    def get_all(self, key: str) -> list[str]:
        return [value for name, value in self.fields if name == key]

    @property
    def event(self) -> str:
        return self.headers.get("Event", "")

    @property
    def response(self) -> str:
        return self.headers.get("Response", "")

    @property
    def action_id(self) -> str:
        return self.headers.get("ActionID", "")

    def __repr__(self) -> str:
        kind = f"Event={self.event}" if self.event else f"Response={self.response}"
        return f"AmiMessage({kind}, {len(self.fields)} fields)"


def parse_message(block: bytes) -> AmiMessage:
    """One message block (without its blank line) into fields."""
    problems: list[str] = []
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = block.decode("utf-8", "replace")
        problems.append(f"bytes that are not UTF-8 at offset {exc.start}")
    fields: list[tuple[str, str]] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line:
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            if line.endswith(":"):  # "Key:" with an empty value
                fields.append((line[:-1], ""))
                continue
            problems.append(f"line {number} is not 'Key: Value': {line[:80]!r}")
            continue
        fields.append((key, value))
    return AmiMessage(fields, problems)


class AmiParser:
    """Incremental framing: ``feed`` bytes as they come, get whole messages back."""

    def __init__(self, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self.banner: str | None = None
        self._buffer = b""

    def feed(self, data: bytes) -> list[AmiMessage]:
        buffer = self._buffer + data if self._buffer else data
        if self.banner is None:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > 1024:
                    raise AmiFramingError(f"no AMI banner in the first {len(buffer)} bytes: {buffer[:60]!r}")
                self._buffer = buffer
                return []
            line = buffer[:end].rstrip(b"\r").decode("utf-8", "replace")
            if not line.startswith(BANNER_PREFIX):
                raise AmiFramingError(f"not an Asterisk manager interface: the first line is {line[:80]!r}")
            self.banner = line
            buffer = buffer[end + 1:]
        messages: list[AmiMessage] = []
        position = 0
        while True:
            match = _END.search(buffer, position)
            if match is None:
                break
            start = position
            position = match.end()
            block = buffer[start:match.start()]
            if not block.strip():
                continue  # stray blank lines between messages
            messages.append(parse_message(block))
        rest = buffer[position:]
        if len(rest) > self.max_message_bytes:
            raise AmiFramingError(f"an AMI message exceeds {self.max_message_bytes} bytes without an end "
                                  f"(starts with {rest[:60]!r})")
        self._buffer = rest
        return messages


def encode_action(action: str, action_id: str, fields: Iterable[tuple[str, str]] = ()) -> bytes:
    """``Action: X\\r\\nActionID: N\\r\\nKey: Value...\\r\\n\\r\\n``; values are checked."""
    lines = [f"Action: {_checked(action)}", f"ActionID: {_checked(action_id)}"]
    for key, value in fields:
        lines.append(f"{_checked(key)}: {_checked(value)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def _checked(value: str) -> str:
    if _UNSAFE_VALUE.search(value):
        raise UnsafeValue(f"AMI value {value[:60]!r} contains a line break")
    return value


def timestamp_ms(raw: str) -> int | None:
    """``Timestamp: 1795335056.792360`` (timestampevents=yes) as integer milliseconds."""
    seconds, _, fraction = raw.strip().partition(".")
    if not seconds.isdigit() or (fraction and not fraction.isdigit()):
        return None
    return int(seconds) * 1000 + int((fraction + "000")[:3])
