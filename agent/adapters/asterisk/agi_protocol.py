"""FastAGI framing (pure: bytes in, values out; no sockets, no clock).

What Asterisk writes (reference/protocols.md §1, captures/asterisk/agi-*.txt), all lines ended
by ``\\n``: the environment block (``agi_key: value`` lines, ``agi_arg_N`` for each AGI()
argument, an empty line at the end), then one reply per command:

    200 result=1 (value)        200 result=0        200 result=-1 endpos=0
    510 Invalid or unknown command
    511 Command Not Permitted on a dead channel or intercept routine
    520-Invalid command syntax.  Proper usage follows:   (multi-line, until "520 End of ...")

plus ``HANGUP`` lines, written out of band whenever the channel hangs up (even between a command
and its reply). ``AgiReplyReader`` returns them as ``HANGUP`` markers and keeps the replies in
step: a HANGUP line is never taken for the reply of the command in flight (panoramisk's mistake).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

ENV_MAX_BYTES = 16 * 1024
MAX_LINE_BYTES = 8 * 1024
_REPLY = re.compile(r"(\d{3})([ -])(.*)")
_RESULT = re.compile(r"result=(-?\d+)(?: \((.*?)\))?(.*)")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\([A-Za-z0-9_,.-]*\))?")
_VALUE_UNSAFE = re.compile(r"[\"\\\r\n]")


class AgiProtocolError(Exception):
    """The peer does not speak FastAGI (bad environment line, oversize block or line)."""


class UnsafeValue(ValueError):
    """A value that cannot be put on an AGI command line."""


@dataclass(frozen=True, slots=True)
class AgiEnvironment:
    values: dict[str, str]
    args: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    def get(self, key: str, default: str = "") -> str:
        return self.values.get(key, default)

    @property
    def script(self) -> str:
        """``agi_network_script`` without the ``?query`` and the slashes (routing key)."""
        return script_name(self.values.get("agi_network_script", ""))


def script_name(raw: str) -> str:
    return raw.partition("?")[0].strip().strip("/")


def split_environment(buffer: bytes) -> tuple[bytes, bytes] | None:
    """The environment block and what follows it, or None while the blank line has not come."""
    end = buffer.find(b"\n\n")
    if end < 0:
        if buffer == b"\n" or buffer.startswith(b"\n"):
            return b"", buffer[1:]  # an empty block
        if len(buffer) > ENV_MAX_BYTES:
            raise AgiProtocolError(f"no end of the AGI environment within {ENV_MAX_BYTES} bytes")
        return None
    return buffer[:end], buffer[end + 2:]


def parse_environment(block: bytes) -> AgiEnvironment:
    """``agi_key: value`` lines into values; args in order of ``agi_arg_N``.

    A line that is not ``agi_*: value`` is reported in ``problems`` and skipped; a block with no
    ``agi_`` line at all raises (the peer is not Asterisk)."""
    text = block.decode("utf-8", "replace")
    values: dict[str, str] = {}
    problems: list[str] = []
    args: dict[int, str] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line:
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or not key.startswith("agi_") or " " in key:
            problems.append(f"line {number} is not 'agi_name: value': {line[:80]!r}")
            continue
        value = value[1:] if value.startswith(" ") else value
        values[key] = value
        if key.startswith("agi_arg_"):
            index = key[len("agi_arg_"):]
            if index.isdigit():
                args[int(index)] = value
    if not values:
        raise AgiProtocolError("the AGI environment has no agi_* line"
                               + (f" ({problems[0]})" if problems else ""))
    ordered = tuple(args[i] for i in sorted(args))
    return AgiEnvironment(values, ordered, tuple(problems))


@dataclass(frozen=True, slots=True)
class AgiReply:
    code: int
    result: int | None = None
    data: str = ""  # the "(...)" part: the value of GET VARIABLE
    rest: str = ""  # "endpos=1234" and friends
    text: str = ""  # the whole first line
    usage: tuple[str, ...] = field(default_factory=tuple)  # 520 multi-line usage

    @property
    def ok(self) -> bool:
        return self.code == 200

    @property
    def value(self) -> str | None:
        """GET VARIABLE: the value, or None when unset (``200 result=0``) or on error."""
        if self.code != 200 or self.result != 1:
            return None
        return self.data


HANGUP: Final = "HANGUP"


def parse_reply_line(line: str) -> AgiReply:
    match = _REPLY.fullmatch(line)
    if match is None:
        raise AgiProtocolError(f"not an AGI reply: {line[:80]!r}")
    code, rest = int(match.group(1)), match.group(3)
    if code == 200:
        result = _RESULT.match(rest)
        if result is not None:
            return AgiReply(code, int(result.group(1)), result.group(2) or "", result.group(3).strip(), line)
    return AgiReply(code, None, "", rest, line)


class AgiReplyReader:
    """Incremental: ``feed`` bytes, get ``AgiReply`` values and ``HANGUP`` markers in order."""

    def __init__(self) -> None:
        self._buffer = b""
        self._usage: list[str] | None = None  # inside a 520- block

    def feed(self, data: bytes) -> list[AgiReply | str]:
        buffer = self._buffer + data
        out: list[AgiReply | str] = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end].rstrip(b"\r").decode("utf-8", "replace")
            start = end + 1
            item = self._line(line)
            if item is not None:
                out.append(item)
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_LINE_BYTES:
            raise AgiProtocolError(f"an AGI reply line exceeds {MAX_LINE_BYTES} bytes")
        return out

    def _line(self, line: str) -> AgiReply | str | None:
        if self._usage is not None:
            if line.startswith("520 "):
                usage, self._usage = tuple(self._usage), None
                return AgiReply(520, None, "", line[4:], line, usage)
            self._usage.append(line)
            return None
        if line == HANGUP:
            return HANGUP
        if not line:
            return None
        if line.startswith("520-"):
            self._usage = [line[4:]]
            return None
        if line.startswith("100 "):
            return None  # "100 result=0 Trying...": a progress line, the real reply follows
        return parse_reply_line(line)


# ------------------------------------------------------------------------------------ commands


def check_variable(name: str) -> str:
    if not _VAR_NAME.fullmatch(name):
        raise UnsafeValue(f"{name!r} is not a channel variable or function name")
    return name


def plain_value(value: str, limit: int = 200) -> str:
    """A value safe inside ``"..."`` on an AGI line (quotes, backslashes, line breaks removed)."""
    return _VALUE_UNSAFE.sub(" ", value).strip()[:limit]


def get_variable(name: str) -> bytes:
    return f"GET VARIABLE {check_variable(name)}\n".encode()


def set_variable(name: str, value: str | int) -> bytes:
    """``SET VARIABLE NAME 4000`` for integers, ``SET VARIABLE NAME "text"`` otherwise."""
    if isinstance(value, int):
        return f"SET VARIABLE {check_variable(name)} {value}\n".encode()
    return f'SET VARIABLE {check_variable(name)} "{plain_value(value)}"\n'.encode()


# A trunk (PJSIP/acme, SIP/carrier@host) is the longest value: carriers allow _ . / : @ + -.
_MSET_VALUE = re.compile(r"[A-Za-z0-9_./:@+-]{0,255}")


def exec_mset(values: list[tuple[str, str | int]]) -> bytes:
    """``EXEC MSet "A=1,B=2"``: several channel variables in one command, so one round trip.

    Real ``res_agi`` reads commands one at a time from a buffered stream: a second command
    written before the first is answered sits in its buffer until more bytes (or the close)
    arrive, so pipelining costs a read timeout per call (seen on Asterisk 20.20 and 22.10). One
    MSet sets the decision and its limit together. Values are plain tokens (MSet splits on
    commas and the AGI line on spaces and quotes), checked here; a name or text already found
    safe is not checked again (the same few names and trunks on every call: a routed decision
    sets 14 variables)."""
    if not values:
        raise UnsafeValue("MSet needs at least one variable")
    pairs = []
    for name, value in values:
        if name not in _SAFE_NAMES:
            check_variable(name)
            _remember(_SAFE_NAMES, name)
        if isinstance(value, int):  # digits and a sign: always a plain token
            text = str(value)
        else:
            text = value
            if text not in _SAFE_VALUES:
                if not _MSET_VALUE.fullmatch(text):
                    raise UnsafeValue(f"{text!r} cannot be set with MSet (letters, digits and ._/:@+- only)")
                _remember(_SAFE_VALUES, text)
        pairs.append(f"{name}={text}")
    return f'EXEC MSet "{",".join(pairs)}"\n'.encode()


# exec_mset: names and values already checked, apart (a name may hold a comma: never a value)
_SAFE_NAMES: set[str] = set()
_SAFE_VALUES: set[str] = set()
_SAFE_MAX = 4_096


def _remember(safe: set[str], text: str) -> None:
    if len(safe) >= _SAFE_MAX:
        safe.clear()
    safe.add(text)
