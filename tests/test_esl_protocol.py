"""ESL framing: the three real FreeSWITCH captures replayed byte for byte, and malformed frames."""

from __future__ import annotations

import random
import re

import pytest

from agent.adapters.freeswitch.adapter import channel_uuids
from agent.adapters.freeswitch.esl_protocol import (
    API_RESPONSE,
    AUTH_REQUEST,
    COMMAND_REPLY,
    DISCONNECT_NOTICE,
    EVENT_PLAIN,
    GOODBYE,
    Event,
    Frame,
    FrameReader,
    FramingError,
    TruncatedFrame,
    encode_api_response,
    encode_auth_request,
    encode_command,
    encode_command_reply,
    encode_disconnect_notice,
    encode_event,
    encode_event_body,
    parse_event,
)
from tests.captures import captures_dir

CAPTURES = captures_dir("freeswitch")
CAPTURE_FILES = ["esl-1-cut-by-sched-hangup.txt", "esl-2-caller-hangs-up.txt", "esl-3-park-authorize-and-api.txt"]
# The recorder wrote "\n### SENT: <command>\n" in place of what the client sent (captures/README.md).
SENT_MARKER = re.compile(rb"\n?### SENT: ([^\n]*)\n")

pytestmark = pytest.mark.skipif(not CAPTURES.is_dir(), reason="captures not available")


def wire_bytes(name: str) -> tuple[bytes, list[tuple[int, str]]]:
    """The server's bytes, and each client command with the wire offset it was sent at."""
    raw = (CAPTURES / name).read_bytes()
    wire = bytearray()
    sent: list[tuple[int, str]] = []
    last = 0
    for marker in SENT_MARKER.finditer(raw):
        wire += raw[last:marker.start()]
        sent.append((len(wire), marker.group(1).decode()))
        last = marker.end()
    wire += raw[last:]
    return bytes(wire), sent


def read_all(data: bytes, chunks: list[int] | None = None) -> list[Frame]:
    reader = FrameReader()
    frames: list[Frame] = []
    pos = 0
    for size in chunks or [len(data)]:
        frames += reader.feed(data[pos:pos + size])
        pos += size
    frames += reader.feed(data[pos:])
    reader.close()
    return frames


def random_chunks(total: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    sizes = [1] * 600  # the first frames byte by byte
    while sum(sizes) < total:
        sizes.append(rng.randint(1, 5000))
    return sizes


@pytest.mark.parametrize("name", CAPTURE_FILES)
def test_every_captured_frame_parses_whatever_the_chunking(name: str) -> None:
    wire, _ = wire_bytes(name)
    whole = read_all(wire)
    assert sum(len(f.body) for f in whole) < len(wire)
    for chunks in (random_chunks(len(wire), 1), random_chunks(len(wire), 2), [7] * (len(wire) // 7)):
        again = read_all(wire, chunks)
        assert [(f.content_type, f.body, f.offset) for f in again] == [
            (f.content_type, f.body, f.offset) for f in whole]
    assert whole[0].content_type == AUTH_REQUEST and whole[-1].content_type == DISCONNECT_NOTICE
    assert whole[-1].body == GOODBYE and len(GOODBYE) == 67


@pytest.mark.parametrize("name", CAPTURE_FILES)
def test_each_command_gets_its_reply_frame(name: str) -> None:
    wire, sent = wire_bytes(name)
    frames = read_all(wire)
    for offset, command in sent:
        reply = next(f for f in frames if f.offset >= offset and f.content_type != EVENT_PLAIN)
        if command.startswith("api "):
            assert reply.content_type == API_RESPONSE, command
        else:
            assert reply.content_type == COMMAND_REPLY, command
            assert reply.reply_text.startswith("+OK"), command


@pytest.mark.parametrize("name", CAPTURE_FILES)
def test_every_captured_event_decodes_and_reencodes_to_the_same_bytes(name: str) -> None:
    """The fake FreeSWITCH uses the same encoder: this proves it writes FreeSWITCH's bytes."""
    wire, _ = wire_bytes(name)
    events = [f for f in read_all(wire) if f.content_type == EVENT_PLAIN]
    assert len(events) > 40
    for frame in events:
        event = parse_event(frame.body)
        assert event.name, frame.offset
        assert encode_event_body(event.pairs(), event.body) == frame.body
        assert encode_event(event.pairs(), event.body) == (
            b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(frame.body) + frame.body)
        assert event.problems == []


def capture_events(name: str) -> list[Event]:
    wire, _ = wire_bytes(name)
    return [parse_event(f.body) for f in read_all(wire) if f.content_type == EVENT_PLAIN]


def test_values_are_url_decoded_and_repeated_headers_keep_the_first() -> None:
    events = capture_events("esl-3-park-authorize-and-api.txt")
    park = next(e for e in events if e.name == "CHANNEL_PARK")
    assert park.get("FreeSWITCH-IPv6") == "fd00::2"
    assert park.get("Channel-Name") == "sofia/customers/1003@127.0.0.1:6303"
    assert park.get("Event-Date-Local") == "2026-11-22 08:15:00"
    assert park.get("variable_accountcode") == "1003"
    assert park.get("Caller-Destination-Number") == "812125551234"
    assert "\n" in park.get("variable_switch_r_sdp")  # an encoded newline stays inside its value
    assert park.get("No-Such-Header", "default") == "default"
    assert park.headers["Unique-ID"] == park.get("Unique-ID")
    hangup = next(e for e in events if e.name == "CHANNEL_HANGUP_COMPLETE")
    assert [name for name, _ in hangup.pairs()].count("Hangup-Cause") == 2
    assert hangup.get("Hangup-Cause") == "NORMAL_CLEARING"


def test_background_job_body_is_kept_apart_from_the_headers() -> None:
    """greenswitch glues this body into its Content-Length header; here it is the event body."""
    wire, _ = wire_bytes("esl-3-park-authorize-and-api.txt")
    frames = read_all(wire)
    job_reply = next(f for f in frames if f.reply_text.startswith("+OK Job-UUID"))
    job = next(parse_event(f.body) for f in frames
               if f.content_type == EVENT_PLAIN and b"BACKGROUND_JOB" in f.body[:40])
    assert job.get("Job-UUID") == job_reply.headers["Job-UUID"]
    assert job.get("Content-Length") == ""
    assert job.body.startswith("UP 0 years") and job.body.endswith("240K/8192K\n")
    assert len(job.body.encode()) == 334


def test_api_replies_of_the_capture() -> None:
    wire, _ = wire_bytes("esl-3-park-authorize-and-api.txt")
    bodies = [f.text() for f in read_all(wire) if f.content_type == API_RESPONSE]
    assert bodies[0] == "+OK\n"
    assert "-ERR No such channel!\n" in bodies
    assert "+OK Message sent\n" in bodies
    listing = next(b for b in bodies if b.startswith("{"))
    assert channel_uuids(listing) == ["b3f5288b-c219-4978-877c-f01b71ab2ae2", "09f29d82-3dad-4462-a08a-c0f27bb79452"]
    assert channel_uuids('{"row_count": 0}\n') == []


def test_frame_encoders_write_the_captured_bytes() -> None:
    wire, _ = wire_bytes("esl-3-park-authorize-and-api.txt")
    assert wire.startswith(encode_auth_request())
    assert encode_command_reply("+OK accepted") in wire
    assert encode_api_response("-ERR No such channel!\n") in wire
    assert wire.endswith(encode_command_reply("+OK bye") + encode_disconnect_notice())
    assert encode_command("api status") == b"api status\n\n"
    with pytest.raises(ValueError, match="one line"):
        encode_command("api status\n\nexit")


# ------------------------------------------------------------------------------------ bad input


def event_frame(headers: list[tuple[str, str]], body: str = "") -> bytes:
    return encode_event(headers, body)


GOOD = event_frame([("Event-Name", "CHANNEL_ANSWER"), ("Unique-ID", "abc")])


def test_a_content_length_too_small_is_named() -> None:
    inner = encode_event_body([("Event-Name", "CHANNEL_ANSWER"), ("Unique-ID", "abc")])
    short = b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % (len(inner) - 5) + inner + GOOD
    reader = FrameReader()
    with pytest.raises(FramingError, match="Content-Length"):
        frames = reader.feed(short)
        for frame in frames:
            parse_event(frame.body)
    with pytest.raises(FramingError):  # the reader stays poisoned: only a new connection recovers
        reader.feed(GOOD)


def test_a_content_length_too_large_swallows_the_next_frame_and_is_named() -> None:
    inner = encode_event_body([("Event-Name", "CHANNEL_ANSWER"), ("Unique-ID", "abc")])
    long = b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % (len(inner) + 30) + inner + GOOD
    reader = FrameReader()
    frames = reader.feed(long[:len(long) - len(GOOD) + 30])
    with pytest.raises(FramingError, match="30 unexpected bytes after the event's headers .* too large"):
        parse_event(frames[0].body, where="frame #1")
    with pytest.raises(FramingError, match="frame #2 at byte"):  # and what is left of the next frame
        reader.feed(GOOD[30:])


def test_a_content_length_that_is_not_a_number_is_named() -> None:
    with pytest.raises(FramingError, match=r"frame #1 at byte 0: Content-Length '12x' of a api/response"):
        FrameReader().feed(b"Content-Type: api/response\nContent-Length: 12x\n\n+OK\n")
    with pytest.raises(FramingError, match="-4"):
        FrameReader().feed(b"Content-Type: api/response\nContent-Length: -4\n\n+OK\n")


def test_a_header_line_without_separator_and_a_missing_content_type() -> None:
    with pytest.raises(FramingError, match=r"header line 2 'garbage'"):
        FrameReader().feed(b"Content-Type: command/reply\ngarbage\n\n")
    with pytest.raises(FramingError, match="no Content-Type"):
        FrameReader().feed(b"Reply-Text: +OK\n\n")
    with pytest.raises(FramingError, match="empty line where a frame should start"):
        FrameReader().feed(b"\n\nContent-Type: command/reply\n\n")


def test_a_truncated_frame_is_reported_at_close() -> None:
    body_length = len(GOOD.split(b"\n\n", 1)[1])
    reader = FrameReader()
    assert reader.feed(GOOD[:-10]) == []
    with pytest.raises(TruncatedFrame, match=f"{body_length - 10} of its {body_length} body bytes"):
        reader.close()
    reader = FrameReader()
    reader.feed(b"Content-Type: command/re")
    with pytest.raises(TruncatedFrame, match="headers"):
        reader.close()


def test_an_event_body_length_that_does_not_match_is_named() -> None:
    inner = b"Event-Name: BACKGROUND_JOB\nJob-UUID: 1\nContent-Length: 10\n\n+OK\n"
    with pytest.raises(FramingError, match="declares a '10'-byte body but 4 bytes follow"):
        parse_event(inner)
    with pytest.raises(FramingError, match="without the empty line"):
        parse_event(b"Event-Name: HEARTBEAT\n")


def test_bad_url_encoding_is_named_and_the_event_still_usable() -> None:
    body = (b"Event-Name: CHANNEL_ANSWER\nUnique-ID: abc\nCaller-Caller-ID-Name: Jo%ZZhn\n"
            b"Caller-Caller-ID-Number: 10%0\nvariable_x: %C3%28\n\n")
    event = parse_event(body, where="event at byte 77")
    assert event.get("Unique-ID") == "abc"
    assert event.get("Caller-Caller-ID-Name") == "Jo%ZZhn"
    assert event.get("Caller-Caller-ID-Number") == "10%0"
    assert event.get("variable_x") == "\ufffd("
    assert len(event.problems) == 3
    assert "event at byte 77: header Caller-Caller-ID-Name value 'Jo%ZZhn' has a bad URL escape '%ZZ' at column 3" \
        in event.problems[0]
    assert "'%0' at column 3" in event.problems[1]
    assert "variable_x decodes to bytes that are not UTF-8" in event.problems[2]


def test_raw_non_ascii_and_lines_without_separator_are_problems_not_crashes() -> None:
    event = parse_event("Event-Name: X\nUnique-ID: é\n\n".encode())
    assert event.get("Unique-ID") == "é"
    assert "raw non-ASCII" in event.problems[0]
    event = parse_event(b"Event-Name: X\njunk line\nUnique-ID: u1\n\n")
    assert event.get("Unique-ID") == "u1"
    event.pairs()
    assert "header line 2 'junk line' is not 'Name: value'" in event.problems[0]


def test_undef_is_an_empty_value_and_round_trips() -> None:
    event = parse_event(b"Event-Name: X\nChannel-Presence-ID: _undef_\n\n")
    assert event.get("Channel-Presence-ID") == ""
    assert encode_event_body(event.pairs()) == b"Event-Name: X\nChannel-Presence-ID: _undef_\n\n"
