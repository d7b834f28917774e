"""AMI and FastAGI framing and translation: the real Asterisk captures replayed byte for byte."""

from __future__ import annotations

import random
from typing import Any

import pytest

from agent.adapters.asterisk.agi_protocol import (
    HANGUP,
    AgiProtocolError,
    AgiReply,
    AgiReplyReader,
    UnsafeValue,
    get_variable,
    parse_environment,
    parse_reply_line,
    set_variable,
    split_environment,
)
from agent.adapters.asterisk.ami_protocol import (
    AmiFramingError,
    AmiMessage,
    AmiParser,
    encode_action,
    parse_message,
    timestamp_ms,
)
from agent.adapters.asterisk.ami_protocol import UnsafeValue as AmiUnsafeValue
from agent.adapters.asterisk.translate import EventTranslator, cause_name, cause_number, duration_ms, peer_of
from agent.core.events import (
    DialBegin,
    Direction,
    LegAnswered,
    LegBridged,
    LegCreated,
    LegEvent,
    LegHungUp,
    LegUnbridged,
    LegUpdated,
)
from tests.captures import captures_dir

CAPTURES = captures_dir("asterisk")
AMI_FILES = ["ami-1-cut-by-limit.txt", "ami-2-caller-hangs-up.txt", "ami-3-actions-live-call.txt",
             "ami-4-busy.txt", "ami-5-exec-dial-in-agi.txt"]
AGI_FILES = ["agi-1-authorize-01.txt", "agi-2-authorize-01.txt", "agi-3-authorize-01.txt",
             "agi-4-authorize-01.txt", "agi-5-exec-dial-01.txt"]

pytestmark = pytest.mark.skipif(not CAPTURES.is_dir(), reason="captures not available")


def ami_messages(name: str, chunks: int | None = None, seed: int = 0) -> tuple[AmiParser, list[AmiMessage]]:
    data = (CAPTURES / name).read_bytes()
    parser = AmiParser()
    out: list[AmiMessage] = []
    if chunks is None:
        return parser, parser.feed(data)
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        size = rng.randint(1, chunks)
        out += parser.feed(data[pos:pos + size])
        pos += size
    return parser, out


def translate_all(messages: list[AmiMessage], translator: EventTranslator | None = None) -> list[LegEvent]:
    translator = translator or EventTranslator()
    events: list[LegEvent] = []
    for message in messages:
        events += translator.translate(message, now_ms=1)
    return events


def of(events: list[LegEvent], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


# ------------------------------------------------------------------------------------ AMI framing


@pytest.mark.parametrize("name", AMI_FILES)
def test_every_capture_frames_the_same_whole_or_in_random_chunks(name: str) -> None:
    parser, whole = ami_messages(name)
    assert parser.banner == "Asterisk Call Manager/9.0.0"
    raw = (CAPTURES / name).read_bytes()
    assert len(whole) == raw.count(b"\r\n\r\n")
    assert all(not m.problems and (m.event or m.response) for m in whole)
    assert whole[0].response == "Success" and whole[0].get("Message") == "Authentication accepted"
    assert whole[1].event == "FullyBooted"
    for seed in range(3):
        _, chunked = ami_messages(name, chunks=97, seed=seed)
        assert [m.fields for m in chunked] == [m.fields for m in whole]


def test_bare_newlines_repeated_keys_and_empty_values() -> None:
    parser = AmiParser()
    messages = parser.feed(b"Asterisk Call Manager/9.0.0\n"
                           b"Event: Newchannel\nChanVariable: A=1\nChanVariable: B=2\nAccountCode: \nExten:\n\n")
    (message,) = messages
    assert message.get_all("ChanVariable") == ["A=1", "B=2"] and message.get("ChanVariable") == "A=1"
    assert message.get("AccountCode") == "" and message.get("Exten") == "" and not message.problems


def test_garbage_lines_are_reported_and_skipped() -> None:
    parser = AmiParser()
    parser.feed(b"Asterisk Call Manager/9.0.0\r\n")
    bad, junk = parser.feed(b"Event: Hangup\r\nthis is not a header\r\nUniqueid: 1.2\r\n\r\n\xff\xfe garbage\r\n\r\n")
    assert bad.event == "Hangup" and bad.get("Uniqueid") == "1.2"
    assert bad.problems == ["line 2 is not 'Key: Value': 'this is not a header'"]
    assert not junk.event and not junk.response
    assert any("not UTF-8" in p for p in junk.problems)


def test_not_an_ami_server_and_endless_messages_raise() -> None:
    with pytest.raises(AmiFramingError, match="not an Asterisk manager interface"):
        AmiParser().feed(b"SSH-2.0-OpenSSH_9.6\r\n")
    parser = AmiParser(max_message_bytes=1000)
    parser.feed(b"Asterisk Call Manager/9.0.0\r\n")
    with pytest.raises(AmiFramingError, match="exceeds 1000 bytes"):
        parser.feed(b"Event: X\r\n" + b"A: b\r\n" * 300)
    with pytest.raises(AmiFramingError, match="no AMI banner"):
        AmiParser().feed(b"x" * 2000)


def test_actions_are_encoded_and_checked() -> None:
    assert encode_action("Hangup", "7", [("Channel", "1795335125.10"), ("Cause", "16")]) == (
        b"Action: Hangup\r\nActionID: 7\r\nChannel: 1795335125.10\r\nCause: 16\r\n\r\n")
    with pytest.raises(AmiUnsafeValue):
        encode_action("Hangup", "8", [("Channel", "x\r\nAction: Originate")])


def test_timestamps_and_durations() -> None:
    assert timestamp_ms("1795335056.792360") == 1795335056792
    assert timestamp_ms("1795335056") == 1795335056000
    assert timestamp_ms("") is None and timestamp_ms("12.x") is None
    assert duration_ms("00:00:52") == 52_000 and duration_ms("26:01:00") == 93_660_000 and duration_ms("x") == 0


# ------------------------------------------------------------------------------------ AMI translation


def test_cut_by_limit_capture_gives_the_call_with_b_billed_from_its_answer() -> None:
    _, messages = ami_messages("ami-1-cut-by-limit.txt")
    events = translate_all(messages)
    a, b = "1795335056.4", "1795335056.5"
    created = {e.leg_id: e for e in of(events, LegCreated)}
    assert created[a].direction is Direction.INBOUND and created[a].group_id == a
    assert created[a].channel == "SIP/127.0.0.1-00000004" and created[a].caller == "1001"
    assert created[b].direction is Direction.OUTBOUND and created[b].group_id == a and created[b].peer == "carrier"
    assert of(events, DialBegin) == [DialBegin(a, b, 1795335056808)]
    answers = {e.leg_id: e.at_ms for e in of(events, LegAnswered)}
    assert answers[b] == 1795335056819  # Newstate Up of the callee
    assert of(events, LegBridged)[0].leg_id == a and of(events, LegBridged)[0].peer_leg_id == b
    assert {e.leg_id for e in of(events, LegUnbridged)} == {a, b}
    hangups = {e.leg_id: e for e in of(events, LegHungUp)}
    assert hangups[b] == LegHungUp(b, 1795335060822, cause="NORMAL_CLEARING", cause_code=16)
    assert hangups[a].at_ms - answers[b] == 4003  # L(4000)
    calls_ids = {e.leg_id: e.sip_call_id for e in of(events, LegUpdated) if e.sip_call_id}
    assert calls_ids == {a: "1-24086@127.0.0.1", b: "03b167e707f221717686fe6a03abf01b@127.0.0.1:5060"}
    # B's Newchannel comes first, DialBegin then names its parent.
    assert events.index(created[b]) < events.index(of(events, DialBegin)[0])


def test_busy_capture_has_no_answer_and_cause_17() -> None:
    _, messages = ami_messages("ami-4-busy.txt")
    events = translate_all(messages)
    b_legs = [e.leg_id for e in of(events, LegCreated) if e.direction is Direction.OUTBOUND]
    assert len(b_legs) == 1
    assert not [e for e in of(events, LegAnswered) if e.leg_id in b_legs]
    assert of(events, LegBridged) == []
    b_end = next(e for e in of(events, LegHungUp) if e.leg_id == b_legs[0])
    assert (b_end.cause, b_end.cause_code) == ("USER_BUSY", 17)


@pytest.mark.parametrize("name", AMI_FILES)
def test_every_capture_ends_every_leg_it_created(name: str) -> None:
    _, messages = ami_messages(name)
    translator = EventTranslator()
    events = translate_all(messages, translator)
    created = {e.leg_id for e in of(events, LegCreated)}
    ended = {e.leg_id for e in of(events, LegHungUp)}
    assert created and created == ended
    assert translator.legs == {} and translator.bridges == {}
    for leg in created:  # answered at most once
        assert len([e for e in of(events, LegAnswered) if e.leg_id == leg]) <= 1


def test_resync_from_core_show_channels() -> None:
    _, messages = ami_messages("ami-3-actions-live-call.txt")
    listing = [m for m in messages if m.event == "CoreShowChannel"]
    translator = EventTranslator()
    live = {leg.leg_id: leg for leg in translator.reset_live(listing, set(), now_ms=1795335129000)}
    assert set(live) == {"1795335125.10", "1795335075.8", "1795335125.11", "1795335075.9"}
    b = live["1795335125.11"]
    assert b.direction is Direction.OUTBOUND and b.parent_leg_id == "1795335125.10" and b.answered
    assert b.created_ms == 1795335129000 - 3000
    assert live["1795335125.10"].direction is Direction.INBOUND
    assert {live["1795335125.10"].bridged_to, b.bridged_to} == {"1795335125.11", "1795335125.10"}
    # A second listing without the older call: its legs ended while we were away.
    again = translator.reset_live([m for m in listing if m.get("Linkedid") == "1795335125.10"],
                                  set(translator.legs), now_ms=1795335130000)
    assert {leg.leg_id for leg in again} == {"1795335125.10", "1795335125.11"}
    assert translator.has_ended("1795335075.8") and translator.has_ended("1795335075.9")
    assert list(translator.bridges) == ["8dd3b5da-507f-45d0-9e31-767cf5c481f0"]  # the ended call's is gone


def test_events_of_unknown_channels_introduce_them() -> None:
    _, messages = ami_messages("ami-2-caller-hangs-up.txt")
    first_bridge = next(i for i, m in enumerate(messages) if m.event == "BridgeEnter")
    translator = EventTranslator()
    events = translate_all(messages[first_bridge:], translator)  # the agent starts mid-call
    created = of(events, LegCreated)
    assert len(created) == 2 and translator.stats.unknown_leg_events >= 2
    assert len(of(events, LegHungUp)) == 2


def test_local_channels_are_plumbing_and_events_without_uniqueid_are_dropped() -> None:
    translator = EventTranslator()
    local = parse_message(b"Event: Newchannel\r\nChannel: Local/200@ctx-0000001a;1\r\nUniqueid: 9.1\r\n"
                          b"Linkedid: 9.1")
    assert translator.translate(local, 5) == []
    assert translator.translate(parse_message(b"Event: Hangup\r\nCause: 16"), 5) == []
    assert translator.stats.dropped == 1


def test_cause_names_and_numbers() -> None:
    assert cause_name(16) == "NORMAL_CLEARING" and cause_name(17) == "USER_BUSY"
    assert cause_name(0, "Unknown cause") == "UNKNOWN_CAUSE" and cause_name(0) == ""
    assert cause_number("NORMAL_CLEARING") == 16 and cause_number("41") == 41 and cause_number("ALLOTTED_TIMEOUT") == 16
    assert peer_of("SIP/carrier-0000000b") == "carrier" and peer_of("PJSIP/my-trunk-00000004") == "my-trunk"


# ------------------------------------------------------------------------------------ FastAGI


def agi_transcript(name: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The environment block, and each (command sent, Asterisk's reply bytes)."""
    env = b""
    exchanges: list[tuple[str, bytes]] = []
    in_env = True
    for line in (CAPTURES / name).read_text().split("\n"):
        if line.startswith("<< ") or line == "<<":
            data = line[3:].encode() + b"\n"
            if in_env:
                env += data
                if data == b"\n":
                    in_env = False
            else:
                command, reply = exchanges[-1]
                exchanges[-1] = (command, reply + data)
        elif line.startswith(">> "):
            exchanges.append((line[3:], b""))
    return env, exchanges


@pytest.mark.parametrize("name", AGI_FILES)
def test_agi_environment_of_every_capture(name: str) -> None:
    env_bytes, exchanges = agi_transcript(name)
    split = split_environment(env_bytes + b"200 result=1\n")
    assert split is not None
    block, rest = split
    assert rest == b"200 result=1\n"
    env = parse_environment(block)
    assert not env.problems
    assert env.get("agi_network") == "yes" and env.get("agi_type") == "SIP"
    assert env.get("agi_uniqueid").count(".") == 1
    if "authorize" in name:
        assert env.script == "authorize" and env.args == (env.get("agi_accountcode"),)
        assert env.get("agi_extension").isdigit()
    else:
        assert env.script == "dial" and env.args == ()
    assert exchanges


@pytest.mark.parametrize("name", AGI_FILES)
def test_agi_replies_of_every_capture(name: str) -> None:
    _, exchanges = agi_transcript(name)
    reader = AgiReplyReader()
    for command, reply_bytes in exchanges:
        (reply,) = reader.feed(reply_bytes)
        assert isinstance(reply, AgiReply)
        if command.startswith("NOT A COMMAND"):
            assert reply.code == 510
        else:
            assert reply.ok, (command, reply)


def test_agi_commands_are_the_bytes_of_the_capture() -> None:
    _, exchanges = agi_transcript("agi-1-authorize-01.txt")
    sent = [command.encode() + b"\n" for command, _ in exchanges]
    assert get_variable("SIPCALLID") in sent
    assert get_variable("CHANNEL(accountcode)") in sent
    assert set_variable("BILLING_DECISION", "allow") in sent
    assert set_variable("BILLING_LIMIT_MS", 4000) in sent
    assert get_variable("CHANNEL(pjsip,call-id)") == b"GET VARIABLE CHANNEL(pjsip,call-id)\n"
    assert set_variable("BILLING_REASON", 'say "hi"\nEXEC x') == b'SET VARIABLE BILLING_REASON "say  hi  EXEC x"\n'
    with pytest.raises(UnsafeValue):
        get_variable("X Y\nHANGUP")


def test_agi_reply_values() -> None:
    _, exchanges = agi_transcript("agi-5-exec-dial-01.txt")
    reader = AgiReplyReader()
    replies = {command: reader.feed(data)[0] for command, data in exchanges}
    dial = replies['EXEC Dial "SIP/carrier/12125551234,30,L(3000)"']
    assert isinstance(dial, AgiReply) and dial.result == -1  # answered call ended: the value is kept
    answered = replies["GET VARIABLE ANSWEREDTIME_MS"]
    assert isinstance(answered, AgiReply) and answered.value == "3001"
    stream = replies['STREAM FILE beep ""']
    assert isinstance(stream, AgiReply) and (stream.result, stream.rest) == (-1, "endpos=0")
    assert parse_reply_line("200 result=0").value is None
    assert parse_reply_line("200 result=1 (a (b) c)").value == "a (b"  # Asterisk does not escape ")"
    assert parse_reply_line("200 result=1 ()").value == ""


def test_hangup_lines_are_out_of_band_and_520_usage_is_one_reply() -> None:
    reader = AgiReplyReader()
    items = reader.feed(b"HANGUP\n200 result=1\n511 Command Not Permitted on a dead channel or intercept routine\n"
                        b"520-Invalid command syntax.  Proper usage follows:\n Usage: SET VARIABLE <x> <y>\n")
    assert items[0] == HANGUP and isinstance(items[1], AgiReply) and items[1].result == 1
    assert isinstance(items[2], AgiReply) and items[2].code == 511 and len(items) == 3
    (usage,) = reader.feed(b"520 End of proper usage.\n100 result=0 Trying...\n")
    assert isinstance(usage, AgiReply) and usage.code == 520 and usage.usage[1] == " Usage: SET VARIABLE <x> <y>"
    assert reader.feed(b"200 result=1 (ANSWER)\nHANGUP\n")[1] == HANGUP


def test_malformed_environments() -> None:
    with pytest.raises(AgiProtocolError, match="no agi_"):
        parse_environment(b"GET / HTTP/1.1\nHost: x")
    env = parse_environment(b"agi_network: yes\nagi_network_script: /authorize?acct=1\nbroken line\n"
                            b"agi_arg_2: b\nagi_arg_1: a\nagi_uniqueid:\n")
    assert env.script == "authorize" and env.args == ("a", "b") and env.get("agi_uniqueid") == ""
    assert env.problems == ("line 3 is not 'agi_name: value': 'broken line'",)
    assert split_environment(b"agi_network: yes\n") is None
    with pytest.raises(AgiProtocolError, match="no end of the AGI environment"):
        split_environment(b"agi_x: " + b"y" * 20_000)
    with pytest.raises(AgiProtocolError, match="not an AGI reply"):
        AgiReplyReader().feed(b"hello\n")


def test_mset_checks_every_name_and_value_and_remembers_only_what_passed() -> None:
    """exec_mset skips the check of a name or value it already found safe (a routed decision
    sets 14 variables per call), apart: a name may hold a comma, a value never; a refused text
    is refused again."""
    from agent.adapters.asterisk.agi_protocol import exec_mset

    assert exec_mset([("CHANNEL(a,b)", 1), ("BILLING_ROUTE_1", "PJSIP/acme")]) == \
        b'EXEC MSet "CHANNEL(a,b)=1,BILLING_ROUTE_1=PJSIP/acme"\n'
    assert exec_mset([("BILLING_ROUTE_1", "PJSIP/acme")]) == b'EXEC MSet "BILLING_ROUTE_1=PJSIP/acme"\n'
    for _ in range(2):
        with pytest.raises(UnsafeValue):
            exec_mset([("X", "CHANNEL(a,b)")])  # a safe name, not a safe value: MSet splits on commas
        with pytest.raises(UnsafeValue):
            exec_mset([("X", "a b")])
        with pytest.raises(UnsafeValue):
            exec_mset([("X Y", 1)])
    assert exec_mset([("X", -5)]) == b'EXEC MSet "X=-5"\n'
