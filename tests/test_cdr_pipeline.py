"""The CDR pipeline service over a real spool and an in-memory store: batching, outages, a full
spool, rejected records, restarts."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gevent.event
import pytest

from agent.adapters.cdr.spool import Spool
from agent.core.cdr import CallRecord
from agent.services.cdr_pipeline import (
    CdrPipeline,
    CdrStoreUnavailable,
    CdrWriteReport,
    PipelineSettings,
    QuarantineRefused,
    RejectedCdr,
    SpoolFull,
    decode_record,
    encode_record,
)
from agent.services.metrics import Metrics
from tests.cdr_builders import make_record


class InMemoryCdrStore:
    """A CdrStore with the SQL store's semantics: idempotent per call id, rejects chosen ids."""

    def __init__(self) -> None:
        self.calls: dict[str, CallRecord] = {}
        self.order: list[str] = []
        self.batches: list[int] = []
        self.quarantined: dict[str, str] = {}
        self.down = False
        self.broken = False
        self.refuse_quarantine = False
        self.reject: set[str] = set()
        self.wrote = gevent.event.Event()

    def write(self, records: Sequence[CallRecord]) -> CdrWriteReport:
        if self.down:
            raise CdrStoreUnavailable("connection refused")
        if self.broken:
            self.broken = False
            raise RuntimeError("a bug in the store")
        rejected = [RejectedCdr(r.call_id, r.node, "bad row", encode_record(r)) for r in records
                    if r.call_id in self.reject]
        for record in records:
            if record.call_id not in self.reject and record.call_id not in self.calls:
                self.calls[record.call_id] = record
                self.order.append(record.call_id)
        self.batches.append(len(records))
        self.wrote.set()
        return CdrWriteReport(written=len(records) - len(rejected), rejected=rejected)

    def quarantine(self, rejected: Sequence[RejectedCdr]) -> None:
        if self.refuse_quarantine:
            raise QuarantineRefused("no")
        for item in rejected:
            self.quarantined[item.call_id] = item.reason


@pytest.fixture
def store() -> InMemoryCdrStore:
    return InMemoryCdrStore()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def make_pipeline(spool_dir: Path, store: InMemoryCdrStore, *, max_bytes: int = 1 << 20,
                  metrics: Metrics | None = None, **settings: int | float) -> CdrPipeline:
    options: dict[str, int | float] = {"batch_size": 10, "backlog_batch_size": 25, "flush_interval_ms": 20,
                                       "retry_max_s": 0.05}
    options.update(settings)
    return CdrPipeline(Spool(spool_dir, max_bytes=max_bytes), store,
                       PipelineSettings(**options), metrics=metrics)  # type: ignore[arg-type]


@pytest.fixture
def pipeline(spool_dir: Path, store: InMemoryCdrStore) -> Iterator[CdrPipeline]:
    p = make_pipeline(spool_dir, store)
    p.start()
    yield p
    p.stop(2)


def ids(n: int, start: int = 0) -> list[str]:
    return [f"call-{i:06d}" for i in range(start, start + n)]


def test_submitted_calls_reach_sql_in_order_in_bounded_batches(pipeline: CdrPipeline,
                                                                store: InMemoryCdrStore) -> None:
    for i in range(95):
        pipeline.submit(make_record(i))
    assert pipeline.flush(5)
    assert store.order == ids(95)
    assert max(store.batches) <= 25 and sum(store.batches) == 95
    assert pipeline.spool.backlog_bytes() == 0


def test_a_full_batch_is_written_without_waiting_for_the_interval(spool_dir: Path, store: InMemoryCdrStore) -> None:
    pipeline = make_pipeline(spool_dir, store, flush_interval_ms=60_000)
    pipeline.start()
    gevent.sleep(0)  # the writer drains the (empty) spool and starts waiting
    for i in range(10):
        pipeline.submit(make_record(i))
    assert store.wrote.wait(timeout=5)
    assert store.order == ids(10)
    pipeline.stop(2)


def test_database_outage_holds_calls_in_the_spool_and_writes_them_once_back(pipeline: CdrPipeline,
                                                                             store: InMemoryCdrStore) -> None:
    store.down = True
    for i in range(40):
        pipeline.submit(make_record(i))
    assert not pipeline.flush(0.2)
    assert store.order == [] and pipeline.counters.retries >= 1
    store.down = False
    assert pipeline.flush(5)
    assert store.order == ids(40)
    assert store.batches == [10, 25, 5]  # a backlog goes in bigger transactions


def test_an_unexpected_store_error_is_retried_not_fatal(pipeline: CdrPipeline, store: InMemoryCdrStore) -> None:
    store.broken = True
    pipeline.submit(make_record(1))
    assert pipeline.flush(5)
    assert store.order == ids(1, 1)


def test_stopping_while_the_database_is_away_keeps_the_calls_for_the_next_start(
        spool_dir: Path, store: InMemoryCdrStore) -> None:
    store.down = True
    first = make_pipeline(spool_dir, store)
    first.start()
    for i in range(25):
        first.submit(make_record(i))
    first.stop(0.2)
    store.down = False
    second = make_pipeline(spool_dir, store)
    second.start()
    assert second.flush(5)
    assert store.order == ids(25)
    second.stop(1)


def test_rejected_calls_are_quarantined_and_the_rest_written(pipeline: CdrPipeline, store: InMemoryCdrStore) -> None:
    store.reject = {"call-000003"}
    for i in range(6):
        pipeline.submit(make_record(i))
    assert pipeline.flush(5)
    assert store.order == [c for c in ids(6) if c != "call-000003"]
    assert store.quarantined == {"call-000003": "bad row"}
    assert pipeline.counters.rejected == 1


def test_when_sql_refuses_the_quarantine_too_the_record_is_kept_locally(pipeline: CdrPipeline,
                                                                         store: InMemoryCdrStore,
                                                                         spool_dir: Path) -> None:
    store.reject = {"call-000001"}
    store.refuse_quarantine = True
    pipeline.submit(make_record(1))
    assert pipeline.flush(5)
    kept = list((spool_dir / "quarantine").glob("rejected-*.json"))
    assert [p.read_bytes() for p in kept] == [encode_record(make_record(1))]
    assert "bad row" in kept[0].with_suffix(".txt").read_text()


def test_a_full_spool_raises_to_the_engine_and_keeps_the_call_in_memory(
        spool_dir: Path, store: InMemoryCdrStore, caplog: pytest.LogCaptureFixture) -> None:
    store.down = True
    pipeline = make_pipeline(spool_dir, store, max_bytes=2_000)
    pipeline.start()
    refused = 0
    for i in range(10):
        try:
            pipeline.submit(make_record(i))
        except SpoolFull:
            refused += 1
    assert refused > 0 and pipeline.counters.refused == refused
    assert "CDR NOT SPOOLED" in caplog.text and "is FULL" in caplog.text
    store.down = False
    assert pipeline.flush(5)
    assert sorted(store.order) == ids(10)  # spooled and in-memory ones alike
    pipeline.stop(1)


def test_metrics_show_the_backlog_the_outage_and_the_visibility_delay(spool_dir: Path,
                                                                      store: InMemoryCdrStore) -> None:
    metrics = Metrics()
    settled_ms = make_record(0).settled_ms or 0
    pipeline = CdrPipeline(Spool(spool_dir, max_bytes=1 << 20), store,
                           PipelineSettings(batch_size=10, flush_interval_ms=20, retry_max_s=0.05),
                           metrics=metrics, now_ms=lambda: settled_ms + 1500)
    pipeline.start()
    store.down = True
    pipeline.submit(make_record(0))
    assert not pipeline.flush(0.15)

    def value(name: str, labels: dict[str, str] | None = None) -> float:
        return metrics.registry.get_sample_value(name, labels or {}) or 0.0

    assert value("billing_cdr_database_up") == 0
    assert value("billing_cdr_queue_depth") == 1
    assert value("billing_cdr_spool_backlog_bytes") > 0  # while it waits, not only after a commit
    store.down = False
    assert pipeline.flush(5)
    assert value("billing_cdr_database_up") == 1
    assert value("billing_cdr_spool_backlog_bytes") == 0
    assert value("billing_cdr_written_total") == 1
    assert value("billing_cdr_visible_seconds_bucket", {"le": "2.0"}) == 1
    assert value("billing_cdr_visible_seconds_bucket", {"le": "1.0"}) == 0
    pipeline.stop(1)


@pytest.mark.parametrize("record", [make_record(1), make_record(2, answered=False),
                                    make_record(3, caller="Zoë \u2603", settled_ms=None, legs=())])
def test_the_spooled_form_is_the_records_dict_and_decodes_back(record: CallRecord) -> None:
    payload = encode_record(record)
    assert payload.isascii()
    assert json.loads(payload) == record.to_dict()
    assert decode_record(payload) == record


@pytest.mark.parametrize("payload", [b"[]", b'{"call_id": "x"}', b"\xff\xfe", b"{"])
def test_anything_else_does_not_decode(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_record(payload)


ODD_TEXT = 'a\\b\tc\nd\re "q" Zoë \u2603 \\N'


@pytest.mark.parametrize("record", [
    make_record(1), make_record(2, answered=False), make_record(3, settled_ms=None, legs=()),
    make_record(4, caller=ODD_TEXT, destination="\\N", hangup_cause="\t", started_ms=1_767_225_600_999),
    make_record(5, cost_micros=-2_500_000, rate_id=None, started_ms=0),
])
def test_the_spooled_form_is_copy_lines_and_decodes_back(record: CallRecord) -> None:
    from agent.services.cdr_lines import copy_rows
    from agent.services.cdr_pipeline import spool_payload

    payload = spool_payload(record)
    settled, call, legs, (decision,) = copy_rows(payload)
    assert settled == (record.settled_ms or record.ended_ms or record.started_ms)
    assert len(call.split(b"\t")) == 13 and len(decision.split(b"\t")) == 27
    assert [len(leg.split(b"\t")) for leg in legs] == [14] * len(record.legs)
    assert decode_record(payload) == record


def test_a_record_the_copy_lines_cannot_carry_is_spooled_as_json() -> None:
    from dataclasses import replace

    from agent.services.cdr_pipeline import spool_payload

    for record in (make_record(1, destination=None), replace(make_record(2), duration_ms=None),
                   make_record(3, started_ms=10**17)):
        payload = spool_payload(record)
        assert payload == encode_record(record)
        assert json.loads(payload)["call_id"] == record.call_id


@pytest.mark.parametrize("damage", [
    lambda p: p.replace(b"\tANSWERED\t", b"\tANSWERED\tX\t"),  # a field too many
    lambda p: p.replace(b"\t61000\t", b"\t61s\t"),  # not an integer
    lambda p: p.replace(b"2026-01-01 00:01:00.000", b"2026-13-01 00:01:00.000"),  # not an instant
    lambda p: p.replace(b"call-000001\t1\t", b"call-000002\t1\t"),  # a decision of another call
    lambda p: p.replace(b"\tt\n", b"\ty\n"),  # not a boolean
    lambda p: p.replace(b"acct-1", b"acct-\xff"),  # not UTF-8
    lambda p: p[:-1],  # the last line cut
    lambda p: p.split(b"\n", 1)[0] + b"\n",  # the header alone
])
def test_damaged_copy_lines_do_not_decode(damage: Any) -> None:
    from agent.services.cdr_pipeline import spool_payload

    payload = damage(spool_payload(make_record(1)))
    assert payload.startswith(b"cdr6\t")
    with pytest.raises(ValueError, match="malformed call record"):
        decode_record(payload)


class FastPathStore(InMemoryCdrStore):
    """With ``write_spooled`` like the SQL store on PostgreSQL; ``fail_once`` names calls whose
    batch fails the first time (the database away), ``refuse`` calls whose batch it hands back."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_once: set[str] = set()
        self.refuse: set[str] = set()
        self.fast_writes: list[str] = []

    def write_spooled(self, payloads: Sequence[bytes], *, sending: Any = None) -> list[int] | None:
        records = [decode_record(p) for p in payloads]
        if sending is not None:
            sending()
        ids = {r.call_id for r in records}
        if ids & self.fail_once:
            self.fail_once -= ids
            raise CdrStoreUnavailable("connection lost")
        if ids & self.refuse:
            return None
        for record in records:
            self.calls.setdefault(record.call_id, record)
            self.fast_writes.append(record.call_id)
        return [r.settled_ms or 0 for r in records]


def _spooled(spool_dir: Path, count: int) -> Spool:
    from agent.services.cdr_pipeline import spool_payload

    spool = Spool(spool_dir, max_bytes=1 << 20)
    for i in range(count):
        spool.append(spool_payload(make_record(i)))
    return spool


@pytest.mark.parametrize("thread", [True, False])
def test_batches_written_ahead_all_land_once_and_leave_the_spool(spool_dir: Path, thread: bool) -> None:
    store = FastPathStore()
    store.fail_once = {"call-000035"}  # a batch written ahead (30-39) fails: the writer writes it itself
    store.refuse = {"call-000047"}  # one the fast path hands back: the general path writes it
    pipeline = CdrPipeline(_spooled(spool_dir, 83), store, PipelineSettings(batch_size=10, backlog_batch_size=10))
    if thread:
        pipeline.replay_now()  # unpatched: the batch ahead goes in a native thread
    else:
        pipeline.start()  # the writer greenlet: the batch ahead goes in a greenlet
        assert pipeline.flush(10)
    assert (pipeline.counters.written, pipeline.spool.backlog_bytes()) == (83, 0)
    assert sorted(store.calls) == [f"call-{i:06d}" for i in range(83)]
    assert sorted(store.fast_writes) == [f"call-{i:06d}" for i in range(83) if not 40 <= i < 50]
    assert [c for c in store.order if c.startswith("call-00004")] == [f"call-{i:06d}" for i in range(40, 50)]
    pipeline.stop(1)


def test_a_batch_written_ahead_leaves_the_spool_only_after_the_one_before_it(spool_dir: Path) -> None:
    store = FastPathStore()
    store.fail_once = {"call-000000"}  # the writer's own batch fails, the one ahead (10-19) is written
    pipeline = CdrPipeline(_spooled(spool_dir, 35), store, PipelineSettings(batch_size=10, backlog_batch_size=10))
    backlog = pipeline.spool.backlog_bytes()
    with pytest.raises(CdrStoreUnavailable):
        pipeline.replay_now()
    assert sorted(store.calls) == [f"call-{i:06d}" for i in range(10, 20)]
    assert pipeline.spool.backlog_bytes() == backlog  # nothing left the spool: 0-9 are not in SQL

    report = pipeline.replay_now()
    assert (report.written, report.backlog_bytes) == (35, 0)
    assert sorted(store.fast_writes) == [f"call-{i:06d}" for i in range(35)]  # 10-19 not written twice
    pipeline.stop(1)


def _as_cdr5(payload: bytes) -> bytes:
    """A cdr6 payload as the cdr5 form wrote it (no buy side in the decisions)."""
    header, rest = payload.split(b"\n", 1)
    lines = rest.split(b"\n")
    count = int(header.rsplit(b"\t", 1)[1])
    decisions = [line.rsplit(b"\t", 7)[0] for line in lines[-1 - count:-1]]
    return b"\n".join([b"cdr5\t" + header[len(b"cdr6\t"):], *lines[:-1 - count], *decisions, b""])


def _as_cdr4(payload: bytes) -> bytes:
    """A one-decision cdr6 payload as the cdr4 form wrote it (no count in the header, no level,
    tenant, account nor customer's call in the decision)."""
    lines = _as_cdr5(payload).split(b"\n")
    settled, count = lines[0][len(b"cdr5\t"):].split(b"\t")
    assert count == b"1"
    return b"\n".join([b"cdr4\t" + settled, *lines[1:-2], lines[-2].rsplit(b"\t", 4)[0], b""])


def test_a_spool_written_before_the_buy_side_still_decodes() -> None:
    """An agent upgraded with cdr5 CDRs in its spool reads them without a carrier; the cdr6 form
    carries the carrier, the buy row, the buy seconds and cost and the margin (DESIGN §10)."""
    import dataclasses

    from agent.services.cdr_lines import decode_lines, encode_lines

    record = make_record(1)
    assert decode_lines(_as_cdr5(encode_lines(record))) == record
    routed = dataclasses.replace(record, rating=dataclasses.replace(
        record.rating, carrier="acme\tbis", buy_rate_id=77, buy_prefix="4477", buy_rate_micros=6_000,
        buy_billed_seconds=66, buy_cost_micros=6_600, margin_micros=-1))
    payload = encode_lines(routed)
    assert payload.startswith(b"cdr6\t")
    assert decode_lines(payload) == routed and decode_record(payload) == routed
    assert decode_record(encode_record(routed)) == routed
    old = decode_lines(_as_cdr5(payload))
    assert (old.rating.carrier, old.rating.buy_cost_micros, old.rating.margin_micros) == ("", None, None)


def test_a_spool_written_before_levels_still_decodes() -> None:
    """The cdr4 form (one decision, no level) is read as the customer's decision; the cdr5 form
    carries the decision of every level above the customer (DESIGN §11) and decodes back."""
    import dataclasses

    from agent.core.cdr import RatingRecord
    from agent.services.cdr_lines import copy_rows, decode_lines, encode_lines

    record = make_record(1)
    assert decode_lines(_as_cdr4(encode_lines(record))) == record
    assert decode_record(_as_cdr4(encode_lines(record))) == record
    derived = dataclasses.replace(record, rating=dataclasses.replace(record.rating, tenant="acme"), upper=(
        RatingRecord(decided_ms=record.rating.decided_ms, plan_name="wholesale", rate_micros=60_000, billed_seconds=61,
                     cost_micros=61_000, currency="USD", plan_currency="USD", plan_cost_micros=61_000, level=1,
                     tenant="default", account_id="tenant:acme"),
        RatingRecord(decided_ms=record.rating.decided_ms, billed_seconds=61, cost_micros=30_500, level=2,
                     tenant="root", account_id="tenant:big\tname")))
    payload = encode_lines(derived)
    assert payload.startswith(b"cdr6\t") and payload.split(b"\n", 1)[0].endswith(b"\t3")
    _, _, legs, decisions = copy_rows(payload)
    assert len(legs) == len(record.legs) and len(decisions) == 3
    assert decisions[1].startswith(record.call_id.encode() + b"^1\t")
    assert decode_lines(payload) == derived and decode_record(payload) == derived
    assert decode_record(encode_record(derived)) == derived


def test_a_spool_written_before_bundle_seconds_still_decodes() -> None:
    """An agent upgraded with CDRs in its spool: the cdr2 form (no bundle_seconds) is read with
    0 bundle seconds, and the current form keeps them."""
    import dataclasses

    from agent.services.cdr_lines import decode_lines, encode_lines

    record = make_record(1)
    assert record.rating is not None
    with_bundle = dataclasses.replace(record, rating=dataclasses.replace(record.rating, bundle_seconds=42))
    assert decode_lines(encode_lines(with_bundle)) == with_bundle
    lines = _as_cdr4(encode_lines(record)).split(b"\n")
    old = b"\n".join([lines[0].replace(b"cdr4\t", b"cdr2\t"), *lines[1:-2],
                      lines[-2].rsplit(b"\t", 6)[0], b""])  # the rating row without its last six fields
    assert old.startswith(b"cdr2\t") and decode_lines(old) == record
    assert decode_record(old) == record


def test_a_spool_written_before_currencies_still_decodes() -> None:
    """The cdr3 form (no currencies, FX rate nor plan-currency cost) is read with none; the
    current form keeps them."""
    import dataclasses

    from agent.services.cdr_lines import decode_lines, encode_lines

    record = make_record(1)
    converted = dataclasses.replace(record, rating=dataclasses.replace(
        record.rating, plan_currency="USD", currency="EUR", fx_rate_e10=9_200_000_000, fx_inverse=True,
        plan_cost_micros=record.rating.cost_micros - 1))
    assert decode_lines(encode_lines(converted)) == converted
    assert decode_record(encode_lines(converted)) == converted
    lines = _as_cdr4(encode_lines(converted)).split(b"\n")
    old = b"\n".join([lines[0].replace(b"cdr4\t", b"cdr3\t"), *lines[1:-2],
                      lines[-2].rsplit(b"\t", 5)[0], b""])  # the rating row without its last five fields
    assert old.startswith(b"cdr3\t") and decode_lines(old) == record
    assert decode_record(old) == record
