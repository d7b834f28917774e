"""``billing-agent demo``: the quick start's first command works on the embedded default and leaves nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PBXES = ("asterisk", "freeswitch")


@dataclass
class DemoRun:
    process: subprocess.Popen[str]
    scratch: Path
    work: Path
    keep: bool


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, DemoRun]]:
    """Both demos start at once (each about 10 s, mostly waiting on its calls): the suite waits
    for them once, not twice."""
    runs: dict[str, DemoRun] = {}
    for pbx in PBXES:
        base = tmp_path_factory.mktemp(f"demo-{pbx}")
        scratch, work = base / "tmp", base / "cwd"
        scratch.mkdir()
        work.mkdir()
        keep = pbx == "freeswitch"
        process = subprocess.Popen(
            [sys.executable, "-m", "agent.entry", "demo", "--pbx", pbx, *(["--keep"] if keep else [])], cwd=work,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TMPDIR": str(scratch), "COLUMNS": "160"})
        runs[pbx] = DemoRun(process, scratch, work, keep)
    yield runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait(10)


@pytest.mark.parametrize("pbx", PBXES)
def test_demo_places_calls_through_the_real_daemon_and_leaves_nothing_behind(pbx: str,
                                                                           demo_runs: dict[str, DemoRun]) -> None:
    run = demo_runs[pbx]
    stdout, stderr = run.process.communicate(timeout=120)
    result = subprocess.CompletedProcess(run.process.args, run.process.returncode, stdout, stderr)
    scratch, work, keep = run.scratch, run.work, run.keep
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "ledger check: OK" in out
    assert "demo passed" in out
    assert "margin of globex: 1 call(s)" in out  # the three-level tenant tree (DESIGN §11)
    for label in ("bob has 8 s of money", "carol has no money", "acme line 2"):
        assert label in out
    # The IRSF burst: the fraud rule's alert and the suspension it caused.
    assert "rule irsf_parallel, live_calls to high_risk = 4" in " ".join(out.split())
    assert "account mallory: suspended, by rule irsf_parallel" in " ".join(out.split())
    # The free-minute bundle: dave's call starts in his 5 s bundle and finishes in money, no connect fee.
    words = " ".join(out.split())
    assert "dave's call to the UK billed" in words and ": 5 s from bundle uk-demo (5 s), then" in words
    assert "no connect fee (a bundle covered the call); bundle now: granted 5 s, used 5 s, left 0 s" in words
    assert "1 bundle period(s) equal to their 2 usage rows" in words
    if keep:  # the admin asked to look at the database, the spool and the log afterwards
        (kept,) = scratch.iterdir()
        assert "authorize call=" in (kept / "agent.log").read_text()
        assert (kept / "billing-agent.db").is_file()
    else:
        assert list(scratch.iterdir()) == []  # the temporary folder is gone
    assert list(work.iterdir()) == []  # nothing written where it was started
