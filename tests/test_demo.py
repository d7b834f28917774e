"""``billing-agent demo``: the quick start's first command works on the embedded default and leaves nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("pbx", ["asterisk", "freeswitch"])
def test_demo_places_calls_through_the_real_daemon_and_leaves_nothing_behind(pbx: str, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    keep = ["--keep"] if pbx == "freeswitch" else []
    result = subprocess.run(
        [sys.executable, "-m", "agent.entry", "demo", "--pbx", pbx, *keep], cwd=work, capture_output=True, text=True,
        timeout=120, check=False, env={**os.environ, "TMPDIR": str(scratch), "COLUMNS": "160"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "ledger check: OK" in out
    assert "demo passed" in out
    for label in ("bob has 8 s of money", "carol has no money", "acme line 2"):
        assert label in out
    # The IRSF burst: the fraud rule's alert and the suspension it caused.
    assert "rule irsf_parallel, live_calls to high_risk = 4" in " ".join(out.split())
    assert "account mallory: suspended, by rule irsf_parallel" in " ".join(out.split())
    if keep:  # the admin asked to look at the database, the spool and the log afterwards
        (kept,) = scratch.iterdir()
        assert "authorize call=" in (kept / "agent.log").read_text()
        assert (kept / "billing-agent.db").is_file()
    else:
        assert list(scratch.iterdir()) == []  # the temporary folder is gone
    assert list(work.iterdir()) == []  # nothing written where it was started
