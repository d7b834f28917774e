"""The PBX's own CDR file (agent/adapters/pbx_cdr.py): what calls that ended while no agent
watched are billed from."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.adapters.pbx_cdr import BadInstant, parse_cdr_lines, parse_columns, parse_instant_ms, read_ended_calls
from agent.core.events import EndedCall


def test_instants_in_the_forms_each_pbx_writes() -> None:
    assert parse_instant_ms("1796276920.123456") == 1796276920123  # Asterisk ${CDR(answer,u)}
    assert parse_instant_ms("1796276920123456") == 1796276920123  # FreeSWITCH ${answer_uepoch}
    assert parse_instant_ms("1796276920123") == 1796276920123  # milliseconds
    assert parse_instant_ms("1796276920") == 1796276920000  # seconds
    assert parse_instant_ms("") is None and parse_instant_ms("0") is None  # never answered
    for bad in ("2026-12-03 05:48:40", "-1.5", "NaN.1", "12a"):
        with pytest.raises(BadInstant):
            parse_instant_ms(bad)


def test_lines_are_merged_per_caller_leg_and_bad_lines_are_named() -> None:
    data = (b'"1796.3","","1796276920.500000","NO ANSWER"\n'          # first trunk failed
            b'"1796.3","1796276921.000000","1796276925.250000","ANSWERED"\n'  # the backup answered
            b'"1796.5","1796276930.000000","1796276931.000000"\n'
            b'"1796.7","2026-12-03 05:48:40","1796276931.000000"\n'
            b'"1796.9","1796276940.000000"\n'
            b'"1796.11","1796276950.000000","1796276949.000000"\n')
    scan = parse_cdr_lines(data, "billing.csv")
    assert scan.calls == {"1796.3": EndedCall("1796.3", 1796276921000, 1796276925250),
                          "1796.5": EndedCall("1796.5", 1796276930000, 1796276931000)}
    assert scan.bad_lines == 3
    assert scan.problems[0].startswith("billing.csv, line 4: not an instant: '2026-12-03 05:48:40'")
    assert scan.problems[1] == "billing.csv, line 5: 2 fields, column 3 is needed (cdr_columns)"
    assert "line 6: answered after it ended" in scan.problems[2]


def test_columns_of_an_existing_freeswitch_template() -> None:
    columns = parse_columns("1,5,6")  # uuid, accountcode, destination, start_epoch, answer_uepoch, end_uepoch
    line = b'"a1b2","1001","33123","1796276920","1796276921000000","1796276923500000","NORMAL_CLEARING"\n'
    assert parse_cdr_lines(line, "Master.csv", columns=columns).calls == {
        "a1b2": EndedCall("a1b2", 1796276921000, 1796276923500)}
    for bad in ("1,2", "0,1,2", "a,b,c", ""):
        with pytest.raises(ValueError, match="cdr_columns"):
            parse_columns(bad)


def test_only_the_tail_of_a_big_file_is_read_and_a_missing_file_is_logged(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "billing.csv"
    lines = [f'"leg{n}","1796276920.000000","1796276921.{n % 1000:03d}000"\n' for n in range(2_000)]
    path.write_text("".join(lines))
    ended = read_ended_calls(path, tail_bytes=len(lines[-1]) * 10 + 5)  # a cut first line is skipped
    assert [call.a_leg_id for call in ended] == [f"leg{n}" for n in range(1_990, 2_000)]
    caplog.set_level("INFO")
    assert read_ended_calls(tmp_path / "missing.csv") == ()  # the PBX has written no CDR yet
    assert "missing.csv: not there (yet)" in caplog.text
    assert read_ended_calls(tmp_path) == ()  # a folder: an error that says what is wrong
    assert "billed from what the balance store knows" in caplog.text


def test_the_file_is_read_again_after_a_resync_for_lines_written_late(tmp_path: Path) -> None:
    import gevent
    import gevent.pool

    from agent.adapters.pbx_cdr import reread_later
    from agent.core.events import PbxCdrReread

    path = tmp_path / "billing.csv"
    path.write_text('"leg1","1796276920.000000","1796276921.000000"\n')
    got: list[PbxCdrReread] = []
    pool = gevent.pool.Group()
    reread_later(pool, "asterisk", str(path), (0, 1, 2), lambda: 42, got.append, delay_s=0.05)
    with path.open("a") as out:  # the PBX writes the last call's line after the listing
        out.write('"leg2","1796276930.000000","1796276931.500000"\n')
    pool.join(timeout=5)
    (event,) = got
    assert (event.pbx, event.at_ms) == ("asterisk", 42)
    assert EndedCall("leg2", 1796276930000, 1796276931500) in event.ended
