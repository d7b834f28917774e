"""The local journal of authorized calls (agent/adapters/authorized_journal.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.adapters.authorized_journal import FILE_NAME, AuthorizedJournal


def _append(journal: AuthorizedJournal, n: int) -> None:
    journal.append(call_id=f"n1-{n}", pbx="asterisk", a_leg_id=str(n), account_id="alice", destination="331",
                   caller="100", authorized_ms=n)


def test_the_next_run_reads_every_call_across_a_rotation_and_skips_a_cut_line(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    journal = AuthorizedJournal(tmp_path, max_bytes=400)
    journal.start()
    for n in range(6):  # about 150 bytes a line: rotated on the way
        _append(journal, n)
    journal.close()
    assert (tmp_path / (FILE_NAME + ".1")).exists()
    with (tmp_path / FILE_NAME).open("ab") as out:
        out.write(b'{"call_id": "n1-9", "pbx"')  # the kill cut this write
    facts = AuthorizedJournal(tmp_path).read()
    assert {"n1-4", "n1-5"} <= set(facts) and "n1-9" not in facts
    assert facts["n1-5"]["a_leg_id"] == "5" and facts["n1-5"]["destination"] == "331"
    assert "not a journal entry" in caplog.text
    nxt = AuthorizedJournal(tmp_path)
    nxt.start()  # a new run begins empty
    nxt.close()
    assert AuthorizedJournal(tmp_path).read() == {}
