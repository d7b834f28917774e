"""The SQL CDR writer on SQLite, PostgreSQL (COPY) and MariaDB: batches, replays, rejected rows,
and a database that goes away and comes back while the pipeline keeps spooling."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from agent.adapters.cdr.spool import Spool
from agent.adapters.sql.cdr_writer import SqlCdrStore
from agent.adapters.sql.engine import make_engine
from agent.adapters.sql.migrate import upgrade
from agent.adapters.sql.models import Call, CallLeg, CdrQuarantine, RatingDecision
from agent.core.cdr import Disposition
from agent.services.cdr_pipeline import CdrPipeline, CdrStoreUnavailable, PipelineSettings, decode_record
from tests.cdr_builders import call_ids, counts, make_record, quarantine_rows
from tests.test_store_guard import CuttableProxy


def test_batch_insert_writes_calls_legs_and_the_rating_decision(engine: Engine) -> None:
    store = SqlCdrStore(engine)
    report = store.write([make_record(i) for i in range(60)])
    assert (report.written, report.rejected) == (60, [])
    assert counts(engine) == (60, 120, 60)
    with Session(engine) as session:
        call = session.get(Call, "call-000007")
        assert call is not None
        assert call.started_at == datetime(2026, 1, 1, 0, 7, tzinfo=UTC)
        assert call.answered_at == datetime(2026, 1, 1, 0, 7, 5, tzinfo=UTC)
        assert (call.duration_ms, call.disposition, call.account_id) == (61_000, "ANSWERED", "acct-1")
        legs = session.scalars(select(CallLeg).where(CallLeg.call_id == "call-000007")
                               .order_by(CallLeg.pbx_unique_id)).all()
        assert [(leg.direction, leg.billed, leg.billsec) for leg in legs] == [("inbound", False, 66),
                                                                            ("outbound", True, 61)]
        decision = session.scalars(select(RatingDecision).where(RatingDecision.call_id == "call-000007")).one()
        assert (decision.seq, decision.billed_seconds, decision.cost_micros) == (1, 61, 122_000)


def test_replaying_a_committed_batch_changes_nothing(engine: Engine) -> None:
    store = SqlCdrStore(engine)
    records = [make_record(i) for i in range(30)]
    store.write(records)
    again = store.write([*records, make_record(99)])
    assert again.written == 31
    assert counts(engine) == (31, 62, 31)
    if again.new_calls is not None:
        assert again.new_calls == 1


def test_a_row_the_database_rejects_is_quarantined_and_the_rest_written(engine: Engine) -> None:
    store = SqlCdrStore(engine)
    records = [make_record(i) for i in range(20)]
    records[7] = make_record(7, destination=None)  # NOT NULL in every backend
    report = store.write(records)
    assert report.written == 19
    assert [r.call_id for r in report.rejected] == ["call-000007"]
    reason = report.rejected[0].reason
    assert "null" in reason.lower() or "destination" in reason.lower(), reason
    store.quarantine(report.rejected)
    store.quarantine(report.rejected)  # a replay quarantines once
    assert quarantine_rows(engine) == [("call-000007", reason)]
    assert len(call_ids(engine)) == 19 and "call-000007" not in call_ids(engine)
    with Session(engine) as session:
        payload = session.scalars(select(CdrQuarantine.payload)).one()
    assert decode_record(payload.encode()).call_id == "call-000007"  # the operator can fix and re-inject it


def test_a_value_too_long_for_its_column(engine: Engine) -> None:
    store = SqlCdrStore(engine)
    report = store.write([make_record(0), make_record(1, destination="4" * 80), make_record(2)])
    if engine.dialect.name == "sqlite":
        assert report.written == 3  # SQLite does not enforce VARCHAR lengths
        return
    assert report.written == 2
    assert [r.call_id for r in report.rejected] == ["call-000001"]
    assert "long" in report.rejected[0].reason.lower()
    assert call_ids(engine) == ["call-000000", "call-000002"]


def test_database_unreachable_is_not_a_rejection(tmp_path: Path) -> None:
    store = SqlCdrStore(make_engine(f"sqlite:///{tmp_path / 'missing' / 'cdr.db'}"))
    with pytest.raises(CdrStoreUnavailable):
        store.write([make_record(1)])


class Outage:
    """Takes a backend's database away and brings it back: a cuttable TCP proxy for the servers,
    a folder that does not exist yet for SQLite."""

    def __init__(self, engine: Engine, tmp_path: Path) -> None:
        self.backend = engine.dialect.name
        self.proxy: CuttableProxy | None = None
        if self.backend == "sqlite":
            self.engine = make_engine(f"sqlite:///{tmp_path / 'later' / 'cdr.db'}")
        else:
            url = engine.url
            self.proxy = CuttableProxy((url.host or "127.0.0.1", url.port or 0))
            self.engine = make_engine(url.set(port=self.proxy.port).render_as_string(hide_password=False),
                                      connect_timeout_seconds=2)
            self.proxy.cut()

    def cut(self) -> None:
        assert self.proxy is not None
        self.proxy.cut()

    def restore(self) -> None:
        if self.proxy is not None:
            self.proxy.restore()
            return
        Path(str(self.engine.url.database)).parent.mkdir()
        upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()
        if self.proxy is not None:
            self.proxy.close()


@pytest.fixture
def outage(engine: Engine, tmp_path: Path) -> Iterator[Outage]:
    down = Outage(engine, tmp_path)
    yield down
    down.close()


def test_database_down_then_up_loses_nothing(outage: Outage, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=10 << 20)
    pipeline = CdrPipeline(spool, SqlCdrStore(outage.engine),
                           PipelineSettings(batch_size=10, flush_interval_ms=20, retry_max_s=0.1))
    pipeline.start()
    try:
        for i in range(35):
            pipeline.submit(make_record(i))
        assert not pipeline.flush(0.4)  # the database is away: the spool holds everything
        assert pipeline.counters.retries >= 1 and spool.backlog_bytes() > 0
        outage.restore()
        assert pipeline.flush(15)
        assert counts(outage.engine) == (35, 70, 35)
        if outage.proxy is not None:  # and once more, mid-stream
            outage.cut()
            for i in range(35, 60):
                pipeline.submit(make_record(i))
            assert not pipeline.flush(0.3)
            outage.restore()
            assert pipeline.flush(15)
            assert counts(outage.engine) == (60, 120, 60)
        assert spool.backlog_bytes() == 0
    finally:
        pipeline.stop(5)


def test_undecodable_spool_entries_are_quarantined_not_dropped(sqlite_engine: Engine, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    spool.append(b'{"call_id": "half a record"')
    spool.append(json.dumps(make_record(1).to_dict()).encode())
    pipeline = CdrPipeline(spool, SqlCdrStore(sqlite_engine))
    report = pipeline.replay_now()
    assert (report.written, report.rejected) == (1, 1)
    rows = quarantine_rows(sqlite_engine)
    assert len(rows) == 1 and "undecodable spool entry at segment 1 offset 0" in rows[0][1]
    assert call_ids(sqlite_engine) == ["call-000001"]
    pipeline.stop(1)


def _disposition(engine: Engine, call_id: str) -> Any:
    with engine.connect() as conn:
        return conn.scalar(select(Call.disposition).where(Call.id == call_id))


def test_unanswered_call_is_written_with_a_zero_decision(engine: Engine) -> None:
    SqlCdrStore(engine).write([make_record(3, answered=False)])
    assert _disposition(engine, "call-000003") == Disposition.NO_ANSWER.value
    assert counts(engine) == (1, 2, 1)


PARTITION_SCRIPT = Path(__file__).resolve().parents[1] / "sql" / "postgresql-partition-cdrs.sql"


@pytest.fixture
def partitioned(postgres_url: str) -> Iterator[Engine]:
    """A migrated PostgreSQL database, then sql/postgresql-partition-cdrs.sql applied."""
    from sqlalchemy import text

    from agent.adapters.sql.models import Base

    eng = make_engine(postgres_url)
    with eng.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    upgrade(eng)
    SqlCdrStore(eng).write([make_record(i) for i in range(5)])  # rows from before the conversion
    raw = eng.raw_connection()
    try:
        with raw.cursor() as cursor:
            cursor.execute(PARTITION_SCRIPT.read_text())
        raw.commit()
    finally:
        raw.close()
    yield eng
    with eng.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP FUNCTION IF EXISTS cdr_ensure_months"))
    eng.dispose()


def test_monthly_partitions_on_postgresql_keep_cdr_writes_idempotent(partitioned: Engine) -> None:
    from sqlalchemy import text

    from agent.adapters.cdr.export import iter_flat
    from agent.adapters.cdr.query import CdrFilter

    with partitioned.connect() as conn:
        parts = set(conn.scalars(text("SELECT relname FROM pg_class WHERE relispartition")))
        assert {"calls_2026_01", "call_legs_2026_01", "calls_default"} <= parts
        assert conn.scalar(text("SELECT count(*) FROM calls_2026_01")) == 5  # the old rows moved in
        conn.execute(text("SELECT cdr_ensure_months('2026-02-01', 0)"))  # the monthly cron
        conn.commit()
    store = SqlCdrStore(partitioned)
    t0_feb = 1_769_904_000_000  # 2026-02-01T00:00:00Z
    records = [make_record(i) for i in range(10)] + [make_record(i, call_id=f"feb-{i}", started_ms=t0_feb + i)
                                                     for i in range(3)]
    assert store.write(records).written == 13
    assert store.write(records).written == 13  # a replay: COPY meets the keys, staging skips them
    assert counts(partitioned) == (13, 26, 13)
    assert len(list(iter_flat(partitioned, CdrFilter()))) == 13
    with partitioned.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM calls_2026_02")) == 3
        assert conn.scalar(text("SELECT count(*) FROM calls_default")) == 0
    with partitioned.begin() as conn:  # retire January as the script's notes say
        conn.execute(text("DELETE FROM rating_decisions WHERE call_id IN (SELECT id FROM calls_2026_01)"))
        conn.execute(text("ALTER TABLE calls DETACH PARTITION calls_2026_01"))
        conn.execute(text("ALTER TABLE call_legs DETACH PARTITION call_legs_2026_01"))
        conn.execute(text("DROP TABLE calls_2026_01, call_legs_2026_01"))
    assert counts(partitioned) == (3, 6, 3)


# ------------------------------------------------------------------- PostgreSQL: spooled JSON to COPY


def _all_rows(engine: Engine) -> list[list[tuple[Any, ...]]]:
    """Every calls, call_legs and rating_decisions row, without the surrogate ids."""
    tables = [(Call, [c for c in Call.__table__.c]),
              (CallLeg, [c for c in CallLeg.__table__.c if c.name != "id"]),
              (RatingDecision, [c for c in RatingDecision.__table__.c if c.name != "id"])]
    with engine.connect() as conn:
        return [sorted(tuple(r) for r in conn.execute(select(*columns))) for _, columns in tables]


def _varied_records() -> list[Any]:
    from dataclasses import replace

    base = make_record(3)
    return [
        make_record(0),
        make_record(1, answered=False),  # no answer instant, no rate id, unbilled legs
        make_record(2, cost_micros=-2_500_000, settled_ms=None, caller="", hangup_cause=""),
        replace(base, legs=()),
        make_record(4, started_ms=1_767_225_600_999, duration_ms=1),  # milliseconds kept
        make_record(5, node="n" * 64, destination="0" * 64),
        _with_levels(make_record(8)),
        replace(_with_levels(make_record(9, call_id="c" * 64)), legs=()),  # level ids within 64 characters
        _routed(make_record(10)),  # the buy side on the customer's decision (DESIGN §10)
        _routed(_with_levels(make_record(11)), level=1),  # ... on the top reseller's
    ]


def _routed(record: Any, level: int = 0) -> Any:
    """The record of a call carried by carrier acme: the buy side on the operator's decision."""
    from dataclasses import replace

    ratings = [record.rating, *record.upper]
    ratings[level] = replace(ratings[level], carrier="acme", buy_rate_id=901, buy_prefix="3361", buy_rate_micros=9_000,
                             buy_billed_seconds=120, buy_cost_micros=18_000, margin_micros=-500)
    return replace(record, rating=ratings[0], upper=tuple(ratings[1:]))


def _with_levels(record: Any) -> Any:
    """The record of a customer of reseller acme (DESIGN §11): acme's account paid the operator."""
    from dataclasses import replace

    from agent.core.cdr import RatingRecord

    rating = record.rating
    return replace(record, rating=replace(rating, tenant="acme"), upper=(
        RatingRecord(decided_ms=rating.decided_ms, plan_name="wholesale", rate_id=7, prefix="33", rate_micros=60_000,
                     billed_seconds=rating.billed_seconds, cost_micros=61_000, currency="USD", plan_currency="USD",
                     plan_cost_micros=61_000, level=1, tenant="default", account_id="tenant:acme"),))


@pytest.mark.parametrize("engine", ["sqlite", "postgresql", "mysql"], indirect=True)
def test_each_level_of_a_reseller_chain_has_its_own_decision_row(engine: Engine) -> None:
    from agent.core.session import level_call_id

    record = _with_levels(make_record(1))
    store = SqlCdrStore(engine)
    assert store.write([record]).written == 1
    assert store.write([record]).written == 1  # a replay adds nothing
    with Session(engine) as session:
        rows = session.scalars(select(RatingDecision).order_by(RatingDecision.level)).all()
    assert [(r.call_id, r.level, r.tenant, r.account_id, r.of_call_id, r.cost_micros) for r in rows] == [
        (record.call_id, 0, "acme", "", None, record.rating.cost_micros),
        (level_call_id(record.call_id, 1), 1, "default", "tenant:acme", record.call_id, 61_000)]


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_spooled_json_goes_to_copy_as_the_same_rows(engine: Engine) -> None:
    from agent.services.cdr_pipeline import encode_record

    records = _varied_records()
    store = SqlCdrStore(engine)
    assert store.write_spooled([encode_record(r) for r in records]) == [
        r.settled_ms or r.ended_ms or r.started_ms for r in records]
    fast = _all_rows(engine)
    with engine.begin() as conn:
        for table in (Call, CallLeg, RatingDecision):
            conn.execute(table.__table__.delete())
    store.write(records)
    assert _all_rows(engine) == fast


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_spooled_copy_lines_go_to_copy_as_the_same_rows(engine: Engine) -> None:
    from dataclasses import replace

    from agent.services.cdr_pipeline import encode_record, spool_payload

    odd = 'a\\b\tc\nd\re "q" Zoë \u2603 \\N'
    records = [*_varied_records(), make_record(6, caller=odd, destination="\\N"),
               replace(make_record(7, hangup_cause="\t"), legs=(replace(make_record(7).legs[0], channel=odd),))]
    payloads = [spool_payload(r) for r in records]
    assert all(p.startswith(b"cdr6\t") for p in payloads)
    payloads[1] = encode_record(records[1])  # an earlier spool's JSON in the same batch
    store = SqlCdrStore(engine)
    assert store.write_spooled(payloads) == [r.settled_ms or r.ended_ms or r.started_ms for r in records]
    fast = _all_rows(engine)
    with engine.begin() as conn:
        for table in (Call, CallLeg, RatingDecision):
            conn.execute(table.__table__.delete())
    store.write(records)
    assert _all_rows(engine) == fast


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_copy_lines_the_database_refuses_take_the_general_path(engine: Engine, tmp_path: Path) -> None:
    from agent.services.cdr_pipeline import spool_payload

    store = SqlCdrStore(engine)
    wrong = spool_payload(make_record(1)).replace(b"\t61000\t", b"\t61s\t")
    assert store.write_spooled([spool_payload(make_record(0)), wrong]) is None
    assert store.write_spooled([spool_payload(make_record(0, caller="nul\x00"))]) is None
    assert counts(engine) == (0, 0, 0)  # nothing of a refused batch stays
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    for payload in (spool_payload(make_record(0)), wrong, spool_payload(make_record(2))):
        spool.append(payload)
    pipeline = CdrPipeline(spool, store, PipelineSettings(batch_size=10))
    report = pipeline.replay_now()
    assert (report.written, report.rejected, report.backlog_bytes) == (2, 1, 0)
    assert call_ids(engine) == ["call-000000", "call-000002"]
    assert [call_id for call_id, _ in quarantine_rows(engine)] == [""]  # undecodable: kept as spooled
    pipeline.stop(1)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_the_fast_path_hands_back_what_it_cannot_write(engine: Engine) -> None:
    from agent.services.cdr_pipeline import encode_record

    store = SqlCdrStore(engine)
    assert store.write_spooled([encode_record(make_record(0, caller='say "hi"'))]) is None  # escaped in JSON
    assert store.write_spooled([encode_record(make_record(0, destination="Zürich"))]) is None  # \u00fc
    assert store.write_spooled([b'{"call_id": "x"}']) is None  # missing fields
    wrong = encode_record(make_record(0)).replace(b'"duration_ms":61000', b'"duration_ms":"61s"')
    assert store.write_spooled([encode_record(make_record(1)), wrong]) is None  # the database refuses it
    assert counts(engine) == (0, 0, 0)  # nothing of a refused batch stays
    assert store.write_spooled([encode_record(make_record(2))]) == [make_record(2).settled_ms]
    assert store.write_spooled([encode_record(make_record(2))]) is None  # already there: a replay
    assert store.write([make_record(2), make_record(3)]).written == 2  # ...which the general path skips
    assert counts(engine) == (2, 4, 2)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_the_pipeline_takes_the_fast_path_and_falls_back_per_batch(engine: Engine, tmp_path: Path) -> None:
    from agent.services.cdr_pipeline import encode_record

    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    records = [make_record(i) for i in range(30)]
    records[12] = make_record(12, destination=None)  # the general path quarantines it
    for record in records:
        spool.append(encode_record(record))
    pipeline = CdrPipeline(spool, SqlCdrStore(engine), PipelineSettings(batch_size=10))
    report = pipeline.replay_now()
    assert (report.written, report.rejected, report.backlog_bytes) == (29, 1, 0)
    assert counts(engine) == (29, 58, 29)
    assert [call_id for call_id, _ in quarantine_rows(engine)] == ["call-000012"]
    spool.close()
