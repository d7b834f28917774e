"""Rate-deck import into a plan, on SQLite, PostgreSQL and MariaDB, and through the CLI."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from agent.adapters.sql.engine import session_factory, transaction
from agent.adapters.sql.models import Rate, RatePlan
from agent.adapters.sql.plans import create_plan
from agent.adapters.sql.rate_import import DeckRejected, import_deck
from agent.cli.main import cli
from agent.core.errors import Conflict, InvalidInput, NotFound

RATES_DIR = Path(__file__).resolve().parent.parent / "rates"
SMALL = RATES_DIR / "sample-small.csv"
PLAN = "retail"


@pytest.fixture
def plan(sessions: sessionmaker[Session]) -> str:
    with transaction(sessions) as s:
        create_plan(s, PLAN, currency="EUR")
    return PLAN


def deck(tmp_path: Path, body: str, name: str = "deck.csv", *, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(body.encode(encoding))
    return path


def stored(sessions: sessionmaker[Session], plan: str = PLAN) -> dict[tuple[str, str, int], int]:
    """(prefix, weekdays, time_from_minute) -> rate_micros of the plan's rates."""
    with transaction(sessions) as s:
        query = (select(Rate.prefix, Rate.weekdays, Rate.time_from_minute, Rate.rate_micros, Rate.effective_from)
                 .join(RatePlan, RatePlan.id == Rate.plan_id).where(RatePlan.name == plan))
        return {(p, w, t, f.isoformat()[:10]): r for p, w, t, r, f in s.execute(query)}  # type: ignore[misc]


def version(sessions: sessionmaker[Session], plan: str = PLAN) -> tuple[int, datetime]:
    with transaction(sessions) as s:
        row = s.execute(select(RatePlan.version, RatePlan.updated_at).where(RatePlan.name == plan)).one()
        return row[0], row[1]


def rejected(sessions: sessionmaker[Session], path: Path, **options: object) -> DeckRejected:
    with pytest.raises(DeckRejected) as info:
        import_deck(sessions, path, PLAN, **options)  # type: ignore[arg-type]
    return info.value


# --- good imports ---------------------------------------------------------------------------

def test_sample_deck_is_imported_with_every_column(sessions: sessionmaker[Session], plan: str) -> None:
    before, updated_before = version(sessions)
    result = import_deck(sessions, SMALL, plan)
    assert (result.rows_imported, result.rows_replaced, result.version) == (15, 0, before + 1)
    assert version(sessions)[0] == before + 1 and version(sessions)[1] >= updated_before
    with transaction(sessions) as s:
        rates = {(r.prefix, r.weekdays, r.time_from_minute, r.effective_from): r for r in s.scalars(select(Rate))}
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    uk_mobile = rates[("447", "", 0, epoch)]
    assert (uk_mobile.rate_micros, uk_mobile.connect_fee_micros, uk_mobile.grace_seconds) == (38_500, 50_000, 3)
    assert rates[("4490", "", 0, epoch)].blocked is True
    assert rates[("33", "", 0, epoch)].destination == "France - Fixed"
    bahamas = rates[("1242", "", 0, epoch)]
    assert (bahamas.initial_increment, bahamas.increment, bahamas.minimum_seconds) == (60, 60, 60)
    change = datetime(2026, 7, 1, tzinfo=UTC)
    assert rates[("39", "", 0, epoch)].effective_to == change
    assert rates[("39", "", 0, change)].rate_micros == 12_500
    night = rates[("41", "12345", 0, epoch)]
    assert (night.time_to_minute, night.rate_micros) == (480, 30_000)
    assert rates[("41", "12345", 1200, epoch)].time_to_minute == 1440


def test_world_deck_imports(sessions: sessionmaker[Session], plan: str) -> None:
    lines = (RATES_DIR / "sample-world.csv").read_text(encoding="utf-8").count("\n")
    assert import_deck(sessions, RATES_DIR / "sample-world.csv", plan).rows_imported == lines - 1 > 2000


def test_bom_semicolons_crlf_and_blank_lines(sessions: sessionmaker[Session], plan: str, tmp_path: Path) -> None:
    body = "\ufeffPrefix;Rate;Destination\r\n+33;0,01;x\r\n".replace("0,01", "0.01")
    body += "\r\n;;\r\n44;0.02;\"Royaume-Uni; fixe\"\r\n"
    import_deck(sessions, deck(tmp_path, body), plan)
    assert stored(sessions) == {("33", "", 0, "1970-01-01"): 10_000, ("44", "", 0, "1970-01-01"): 20_000}


def test_adding_to_a_plan_keeps_its_rates(sessions: sessionmaker[Session], plan: str, tmp_path: Path) -> None:
    import_deck(sessions, SMALL, plan)
    more = deck(tmp_path, "prefix,rate,effective_from\n34,0.02,\n3906,0.011,2027-01-01\n")
    result = import_deck(sessions, more, plan)
    assert result.rows_imported == 2 and result.version == 3
    rates = stored(sessions)
    assert len(rates) == 17 and rates[("3906", "", 0, "2027-01-01")] == 11_000


def test_unknown_plan_is_an_error_unless_created(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="unknown rate plan 'gold'.*--create-plan"):
        import_deck(sessions, SMALL, "gold")
    with transaction(sessions) as s:
        assert s.scalar(select(func.count()).select_from(RatePlan)) == 0
    with pytest.raises(InvalidInput, match="plan name 'gold plan!'"):
        import_deck(sessions, SMALL, "gold plan!", create_missing_plan=True)
    result = import_deck(sessions, SMALL, "gold", create_missing_plan=True, currency="usd")
    assert result.plan_created and result.version == 2
    with transaction(sessions) as s:
        assert s.scalar(select(RatePlan.currency).where(RatePlan.name == "gold")) == "USD"


def test_a_bad_deck_does_not_create_the_plan(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    with pytest.raises(DeckRejected):
        import_deck(sessions, deck(tmp_path, "prefix,rate\n33,-1\n"), "gold", create_missing_plan=True)
    with transaction(sessions) as s:
        assert s.scalar(select(func.count()).select_from(RatePlan)) == 0


def test_currency_of_an_existing_plan_is_checked(sessions: sessionmaker[Session], plan: str) -> None:
    with pytest.raises(InvalidInput, match="priced in EUR, not USD"):
        import_deck(sessions, SMALL, plan, currency="USD")


# --- replace and atomicity ------------------------------------------------------------------

def read_committed_rates(engine: Engine) -> set[tuple[str, int]]:
    """What another node reads right now, through its own connection."""
    if engine.dialect.name == "sqlite":
        # Not through the engine: its BEGIN IMMEDIATE would wait for the importer's write lock.
        with closing(sqlite3.connect(str(engine.url.database))) as conn:
            return set(conn.execute("SELECT prefix, rate_micros FROM rates"))
    with engine.connect() as conn:
        return {(p, r) for p, r in conn.execute(text("SELECT prefix, rate_micros FROM rates"))}


def test_replace_is_atomic_for_readers(engine: Engine, sessions: sessionmaker[Session], plan: str,
                                       tmp_path: Path) -> None:
    import_deck(sessions, deck(tmp_path, "prefix,rate\n33,0.01\n44,0.02\n"), plan)
    old = {("33", 10_000), ("44", 20_000)}
    seen_while_writing: list[set[tuple[str, int]]] = []

    def peek(phase: str, done: int, total: int) -> None:
        if phase == "write" and done == total:  # every new row written, nothing committed
            seen_while_writing.append(read_committed_rates(engine))

    new_deck = deck(tmp_path, "prefix,rate\n33,0.03\n49,0.04\n", "new.csv")
    result = import_deck(sessions, new_deck, plan, replace=True, progress=peek)
    assert (result.rows_imported, result.rows_replaced) == (2, 2)
    assert seen_while_writing and all(seen == old for seen in seen_while_writing)
    assert read_committed_rates(engine) == {("33", 30_000), ("49", 40_000)}


def test_failed_replace_leaves_the_old_plan(sessions: sessionmaker[Session], plan: str, tmp_path: Path) -> None:
    import_deck(sessions, SMALL, plan)
    before_rates, before_version = stored(sessions), version(sessions)

    def crash(phase: str, done: int, total: int) -> None:
        if phase == "write" and done == total:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        import_deck(sessions, deck(tmp_path, "prefix,rate\n1,0.5\n"), plan, replace=True, progress=crash)
    bad = deck(tmp_path, "prefix,rate\n1,0.5\n2,-1\n", "bad.csv")
    rejected(sessions, bad, replace=True)
    assert stored(sessions) == before_rates and version(sessions) == before_version


def test_replace_may_reuse_the_keys_it_deletes(sessions: sessionmaker[Session], plan: str) -> None:
    import_deck(sessions, SMALL, plan)
    result = import_deck(sessions, SMALL, plan, replace=True)
    assert (result.rows_imported, result.rows_replaced, result.version) == (15, 15, 3)


def test_the_rows_written_are_the_rows_checked(sessions: sessionmaker[Session], plan: str, tmp_path: Path) -> None:
    path = deck(tmp_path, "prefix,rate\n33,0.01\n")

    def edit(phase: str, done: int, total: int) -> None:
        if phase == "validate" and done == total:  # someone saves the file after it was checked
            path.write_text("prefix,rate\n33,0.01\n34,-5\n", encoding="utf-8")

    assert import_deck(sessions, path, plan, progress=edit).rows_imported == 1
    assert stored(sessions) == {("33", "", 0, "1970-01-01"): 10_000}


def test_an_import_that_raced_ours_stops_ours(sessions: sessionmaker[Session], plan: str, tmp_path: Path) -> None:
    first = deck(tmp_path, "prefix,rate\n33,0.01\n", "first.csv")
    second = deck(tmp_path, "prefix,rate\n33,0.02\n", "second.csv")

    def other_import(phase: str, done: int, total: int) -> None:
        if phase == "validate" and done == total:  # ours validated against an empty plan
            import_deck(sessions, first, plan)

    with pytest.raises(Conflict, match="changed by another import"):
        import_deck(sessions, second, plan, progress=other_import)
    assert stored(sessions) == {("33", "", 0, "1970-01-01"): 10_000}


# --- bad decks: each is refused with a clear reason and stores nothing ----------------------

BAD_DECKS = {
    "missing header": ("33,0.01\n", "deck.csv:1: missing header row"),
    "missing required column": ("prefix,destination\n33,France\n", "missing required column 'rate'"),
    "unknown column": ("prefix,rate,colour\n33,0.01,red\n", "column #3: value 'colour': unknown column"),
    "empty prefix": ("prefix,rate\n,0.01\n", "deck.csv:2: column prefix: value '': prefix is empty"),
    "non-digit prefix": ("prefix,rate\n33a,0.01\n", "column prefix: value '33a': prefix must be digits only"),
    "duplicate prefix": ("prefix,rate\n33,0.01\n34,0.01\n+33,0.02\n",
                         "deck.csv:4: column prefix: value '33': duplicate of line 2"),
    "overlapping ranges": ("prefix,rate,effective_from,effective_to\n33,0.01,2026-01-01,2026-03-01\n"
                           "33,0.02,2026-02-01,\n", "deck.csv:3: column prefix: value '33': overlaps line 2"),
    "negative rate": ("prefix,rate\n33,-0.01\n", "column rate: value '-0.01': must not be negative"),
    "non-numeric rate": ("prefix,rate\n33,cheap\n", "column rate: value 'cheap': is not a number"),
    "7 decimals": ("prefix,rate\n33,0.0000001\n", "more than 6 decimals"),
    "effective_to before effective_from": ("prefix,rate,effective_from,effective_to\n33,0.01,2026-02-01,2026-01-01\n",
                                           "column effective_to: value '2026-01-01': must be after effective_from"),
    "not UTF-8": ("prefix,rate,destination\n33,0.01,France\n39,0.02,Citt\xe0\n",
                  "deck.csv:3: byte offset 51: not valid UTF-8 (byte 0xe0)"),
    "UTF-16": ("prefix,rate\n33,0.01\n", "deck.csv:1: the file is UTF-16"),
    "empty file": ("", "deck.csv: the file is empty"),
    "header only": ("prefix,rate\n", "no rate rows after the header"),
    "ragged line": ("prefix,rate\n33,0.01,x\n", "deck.csv:2: line has 3 fields where the header has 2"),
}
ENCODINGS = {"not UTF-8": "latin-1", "UTF-16": "utf-16"}


def test_every_bad_deck_is_refused_and_stores_nothing(sessions: sessionmaker[Session], plan: str,
                                                        tmp_path: Path) -> None:
    import_deck(sessions, deck(tmp_path, "prefix,rate\n1,0.5\n", "base.csv"), plan)
    before_rates, before_version = stored(sessions), version(sessions)
    for case, (body, expected) in BAD_DECKS.items():
        for replace in (False, True):
            error = rejected(sessions, deck(tmp_path, body, encoding=ENCODINGS.get(case, "utf-8")), replace=replace,
                             source="deck.csv")
            described = [e.describe(error.source) for e in error.errors]
            assert any(expected in line for line in described), (case, described)
            assert stored(sessions) == before_rates and version(sessions) == before_version, case


def test_a_clash_with_a_stored_rate_is_refused_without_replace(sessions: sessionmaker[Session], plan: str,
                                                                 tmp_path: Path) -> None:
    import_deck(sessions, SMALL, plan)
    path = deck(tmp_path, "prefix,rate,effective_from\n39,0.02,2026-09-01\n34,0.01,\n")
    error = rejected(sessions, path)
    assert [(e.line, e.column, e.value) for e in error.errors] == [(2, "prefix", "39")]
    assert "overlaps a rate already stored in the plan" in error.errors[0].reason
    assert len(stored(sessions)) == 15
    assert import_deck(sessions, path, plan, replace=True).rows_imported == 2


def test_unknown_plan_stores_nothing(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(NotFound):
        import_deck(sessions, SMALL, "nope")
    assert stored(sessions, "nope") == {}


# --- error reporting ------------------------------------------------------------------------

def test_all_errors_are_reported_with_their_lines(sessions: sessionmaker[Session], plan: str, tmp_path: Path) -> None:
    body = ("prefix,rate,increment\n"
            "33,0.01,60\n"
            "x,0.01,60\n"      # line 3
            "34,-1,0\n"        # line 4: two errors
            "\n"               # line 5: blank, skipped
            "\"3\n5\",0.01,1\n"  # lines 6-7: a quoted newline inside the prefix
            "36,0.01,1\n"
            "33,0.02,6\n")     # line 9: duplicate of line 2
    error = rejected(sessions, deck(tmp_path, body))
    assert [(e.line, e.column) for e in error.errors] == [
        (3, "prefix"), (4, "rate"), (4, "increment"), (6, "prefix"), (9, "prefix")]
    assert error.error_count == 5 and "5 errors; nothing was imported" in str(error)


def test_error_list_is_capped_but_counted(sessions: sessionmaker[Session], plan: str, tmp_path: Path) -> None:
    body = "prefix,rate\n" + "".join(f"{n},-1\n" for n in range(1, 251))
    error = rejected(sessions, deck(tmp_path, body), max_errors=100)
    assert len(error.errors) == 100 and error.error_count == 250
    assert error.errors[-1].line == 101


# --- CLI ------------------------------------------------------------------------------------

def test_cli_import(sqlite_engine: Engine, tmp_path: Path) -> None:
    url = sqlite_engine.url.render_as_string(hide_password=False)
    runner = CliRunner()
    unknown = runner.invoke(cli, ["--database-url", url, "rates", "import", str(SMALL), "--plan", "retail"])
    assert unknown.exit_code == 1 and "unknown rate plan 'retail'" in unknown.stderr

    ok = runner.invoke(cli, ["--database-url", url, "rates", "import", str(SMALL), "--plan", "retail",
                             "--create-plan"])
    assert ok.exit_code == 0, ok.output
    assert "imported 15 rates into plan retail (plan created): version 2" in ok.stdout
    assert ok.stderr == ""  # no progress bar outside a terminal

    bad = deck(tmp_path, "prefix,rate\n33,0.01\n34,-1\n35,0.1234567\n")
    refused = runner.invoke(cli, ["--database-url", url, "rates", "import", str(bad), "--plan", "retail", "--replace"])
    assert refused.exit_code == 1
    assert refused.stderr.splitlines() == [
        f"{bad}:3: column rate: value '-1': must not be negative",
        f"{bad}:4: column rate: value '0.1234567': has more than 6 decimals",
        f"error: {bad}: 2 errors; nothing was imported",
    ]
    with transaction(session_factory(sqlite_engine)) as s:
        assert s.scalar(select(func.count()).select_from(Rate)) == 15
        assert s.scalar(select(RatePlan.version)) == 2

    replaced = runner.invoke(cli, ["--database-url", url, "rates", "import", str(SMALL), "--plan", "retail",
                                   "--replace"])
    assert replaced.exit_code == 0 and "replacing 15: version 3" in replaced.stdout


def test_cli_created_plan_takes_the_configured_currency(sqlite_engine: Engine) -> None:
    url = sqlite_engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(cli, ["--database-url", url, "rates", "import", str(SMALL), "--plan", "uk",
                                      "--create-plan"], env={"BILLING_AGENT_BILLING_DEFAULT_CURRENCY": "GBP"})
    assert result.exit_code == 0, result.output
    with transaction(session_factory(sqlite_engine)) as s:
        assert s.scalar(select(RatePlan.currency).where(RatePlan.name == "uk")) == "GBP"
