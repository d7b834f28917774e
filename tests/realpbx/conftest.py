"""Fixtures of the real-PBX suite: skipped, with the reason, when no PBX is installed (CI has none)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.realpbx.lab import Agent, AsteriskPbx, Carrier, FreeswitchPbx, Pbx, PbxBuild, discover, free_port

BUILDS, NOTES = discover()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "build" in metafunc.fixturenames:
        if BUILDS:
            metafunc.parametrize("build", BUILDS, ids=[b.label for b in BUILDS], scope="module")
        else:
            metafunc.parametrize("build", [pytest.param(None, marks=pytest.mark.skip(reason="; ".join(NOTES)))],
                                 ids=["no-pbx"], scope="module")


class Lab:
    """One PBX, one carrier and one agent, started for a test module and stopped after it."""

    def __init__(self, build: PbxBuild, folder: Path, *, ami_read: str = "", ami_write: str = "",
                 agent_extra: dict[str, Any] | None = None, congested_carriers: tuple[str, ...] = ()) -> None:
        self.build = build
        self.folder = folder
        self.carrier = Carrier(folder)
        # More trunks, each to a carrier of its own that answers every call 503 (routing tests).
        self.congested = [Carrier(folder, name, congested=True) for name in congested_carriers]
        trunks = {c.name: c.port for c in self.congested}
        self.pbx: Pbx
        if build.kind == "asterisk":
            self.pbx = AsteriskPbx(build, folder / "pbx", self.carrier.port, free_port(), ami_read=ami_read,
                                   ami_write=ami_write, extra_trunks=trunks)
        else:
            self.pbx = FreeswitchPbx(build, folder / "pbx", self.carrier.port, extra_trunks=trunks)
        self.agent = Agent(folder, self.pbx.agent_settings(), extra=agent_extra)

    def stop(self) -> None:
        for thing in (self.agent, self.pbx, self.carrier, *self.congested):
            try:
                thing.stop()
            except Exception:  # noqa: BLE001 - stop the others whatever happens
                pass


@pytest.fixture(scope="module")
def lab_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    labs: list[Lab] = []

    def make(build: PbxBuild, name: str, **options: Any) -> Lab:
        lab = Lab(build, tmp_path_factory.mktemp(f"{name}-{build.label}"), **options)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.stop()
