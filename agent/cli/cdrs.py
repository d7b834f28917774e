"""``billing-agent cdrs``: list, show, export and reconcile the call records; replay the spool."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from datetime import datetime
from typing import IO, Any, TypeVar

import click

from agent.adapters.cdr.export import (
    CSV_COLUMNS,
    FlatCdr,
    copy_csv,
    csv_row,
    fx_text,
    iter_flat,
    route_json,
    server_csv_supported,
)
from agent.adapters.cdr.export import cdr_json as flat_json
from agent.adapters.cdr.query import CdrFilter, CdrView, DecisionView, LegView, get_cdr, get_levels
from agent.adapters.cdr.reconcile import ReconcileLine, ReconcileSummary, reconcile
from agent.adapters.sql.tenants import subtree_ids
from agent.cli.common import app, fail, handle_errors, print_json
from agent.core.cdr import Disposition
from agent.core.clock import parse_iso8601
from agent.core.money import format_amount

F = TypeVar("F", bound=Callable[..., Any])

# --------------------------------------------------------------------------- options


def _instant(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_iso8601(value, what=f"--{param.name}")
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (e.g. 2026-01-31, 2026-01-31T08:00:00Z or with an offset)") from None


def _disposition(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    wanted = value.strip().upper().replace("_", " ")
    known = [d.value for d in Disposition]
    if wanted not in known:
        raise click.BadParameter(f"{value!r} is not one of {', '.join(known)}")
    return wanted


def filter_options(func: F) -> F:
    """--account, --since, --until, --destination, --disposition, --node (all optional)."""
    options = [
        click.option("--account", "account_id", help="Only this account."),
        click.option("--since", callback=_instant, metavar="ISO8601",
                     help="Calls started at or after (UTC if no offset)."),
        click.option("--until", callback=_instant, metavar="ISO8601", help="Calls started before."),
        click.option("--destination", "destination_prefix", metavar="PREFIX", help="Destination numbers starting so."),
        click.option("--disposition", callback=_disposition,
                     help="ANSWERED, NO_ANSWER, BUSY, FAILED, DENIED or CUT."),
        click.option("--node", help="Only calls of this agent node."),
        click.option("--tenant", help="Only calls of the accounts of this tenant and the tenants below it."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filter(kwargs: dict[str, Any]) -> CdrFilter:
    where = CdrFilter(**{k: kwargs.pop(k) for k in ("account_id", "since", "until", "destination_prefix",
                                                    "disposition", "node")})
    check_range(where.since, where.until)
    tenant = kwargs.pop("tenant", None)
    if tenant:
        with app(click.get_current_context()).transaction() as session:
            where = replace(where, tenant_ids=subtree_ids(session, tenant))
    return where


def check_range(since: datetime | None, until: datetime | None) -> None:
    """A reversed --since/--until is a mistake, not an empty answer."""
    if since is not None and until is not None and until <= since:
        fail(f"--until {until.isoformat()} is not after --since {since.isoformat()}: the range "
             "[since, until) holds no call")


# --------------------------------------------------------------------------- rendering


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def leg_json(leg: LegView) -> dict[str, Any]:
    return {
        "pbx_unique_id": leg.pbx_unique_id, "direction": leg.direction, "channel": leg.channel,
        "sip_call_id": leg.sip_call_id, "peer": leg.peer, "caller": leg.caller, "callee": leg.callee,
        "created_at": _iso(leg.created_at), "answered_at": _iso(leg.answered_at), "ended_at": _iso(leg.ended_at),
        "hangup_cause": leg.hangup_cause, "billsec": leg.billsec, "billed": leg.billed,
    }


def decision_json(d: DecisionView) -> dict[str, Any]:
    return {
        "seq": d.seq, "plan": d.plan_name, "rate_id": d.rate_id, "prefix": d.prefix,
        "rate_per_minute": format_amount(d.rate_micros), "billed_seconds": d.billed_seconds,
        "cost": format_amount(d.cost_micros), "decided_at": _iso(d.decided_at), "reason": d.reason,
        "currency": d.currency or None, "plan_currency": d.plan_currency or None,
        "plan_cost": format_amount(d.plan_cost_micros) if d.plan_cost_micros is not None else None,
        "fx_rate": fx_text(d.fx_rate_e10, d.fx_inverse),
        "route": route_json(d.carrier, d.buy_prefix, d.buy_rate_micros, d.buy_billed_seconds, d.buy_cost_micros,
                            d.margin_micros),
    }




def cdr_json(v: CdrView) -> dict[str, Any]:
    return {
        "call_id": v.call_id, "node": v.node, "pbx": v.pbx, "account_id": v.account_id, "caller": v.caller,
        "destination": v.destination, "started_at": _iso(v.started_at), "answered_at": _iso(v.answered_at),
        "ended_at": _iso(v.ended_at), "duration_ms": v.duration_ms, "disposition": v.disposition,
        "hangup_cause": v.hangup_cause, "settled_at": _iso(v.settled_at),
        "rating": decision_json(v.rating) if v.rating else None,
        "legs": [leg_json(leg) for leg in v.legs],
    }


def write_csv(cdrs: Iterable[FlatCdr], out: IO[str], *, with_legs: bool = False) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, "legs"] if with_legs else CSV_COLUMNS)
    count = 0
    for cdr in cdrs:
        writer.writerow(csv_row(cdr, with_legs=with_legs))
        count += 1
    return count


def write_jsonl(cdrs: Iterable[FlatCdr], out: IO[str]) -> int:
    count = 0
    for cdr in cdrs:
        out.write(json.dumps(flat_json(cdr), separators=(",", ":")))
        out.write("\n")
        count += 1
    return count


def _table(cdrs: Iterable[FlatCdr]) -> None:
    click.echo(f"{'started (UTC)':<20} {'call':<24} {'account':<14} {'destination':<16} {'disposition':<11} "
               f"{'secs':>6} {'billed':>6} {'cost':>16}  node")
    for cdr in cdrs:
        c, d = cdr.call, cdr.decision
        started = f"{c[6][:10]} {c[6][11:19]}"
        cost = f"{format_amount(d[6])} {d[9] or '?'}" if d else "-"
        click.echo(f"{started:<20} {c[0][:24]:<24} {c[3][:14]:<14} {c[5][:16]:<16} {c[10]:<11} "
                   f"{-(-c[9] // 1000):>6} {d[5] if d else '-':>6} {cost:>16}  {c[1]}")


# --------------------------------------------------------------------------- commands


@click.group()
def cdrs() -> None:
    """Call detail records: every settled call, its legs and its rating decisions."""


@cdrs.command(name="list")
@filter_options
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True,
              help="At most this many calls (0 = all; for big exports use `cdrs export`).")
@click.option("--json", "fmt", flag_value="json", help="A JSON array.")
@click.option("--csv", "fmt", flag_value="csv", help="CSV with a header line.")
@click.option("--jsonl", "fmt", flag_value="jsonl", help="JSON lines, one call per line.")
@click.option("--legs", "with_legs", is_flag=True, help="CSV: add a `legs` column, every leg as JSON.")
@click.pass_context
@handle_errors
def list_command(ctx: click.Context, /, limit: int, fmt: str | None, with_legs: bool, **filters: Any) -> None:
    """Calls in start order, with their current rating decision."""
    cdrs = iter_flat(app(ctx).engine(), _filter(filters), limit=limit or None)
    if fmt is None:
        _table(cdrs)
    elif fmt == "json":
        print_json([flat_json(cdr) for cdr in cdrs])
    elif fmt == "csv":
        write_csv(cdrs, sys.stdout, with_legs=with_legs)
    else:
        write_jsonl(cdrs, sys.stdout)


@cdrs.command()
@click.argument("call_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def show(ctx: click.Context, call_id: str, as_json: bool) -> None:
    """One call: its facts, every leg and its whole rating history (the last one counts)."""
    engine = app(ctx).engine()
    view, history = get_cdr(engine, call_id)
    levels = get_levels(engine, call_id)
    data = cdr_json(view)
    data["rating_history"] = [decision_json(d) for d in history]
    data["levels"] = [{"level": d.level, "account_id": d.level_account_id, "seller": d.tenant, **decision_json(d)}
                      for d in levels]
    if as_json:
        print_json(data)
        return
    for key in ("call_id", "account_id", "node", "pbx", "caller", "destination", "disposition", "hangup_cause",
                "started_at", "answered_at", "ended_at", "settled_at", "duration_ms"):
        click.echo(f"{key.replace('_', ' '):<14} {data[key] if data[key] is not None else '-'}")
    click.echo(f"legs ({len(view.legs)}):")
    for leg in view.legs:
        mark = " (billed)" if leg.billed else ""
        click.echo(f"  {leg.direction:<8} {leg.pbx_unique_id}  {leg.channel}  peer {leg.peer or '-'}  sip "
                   f"{leg.sip_call_id or '-'}  billsec {leg.billsec}  {leg.hangup_cause}{mark}")
    click.echo("rating decisions:")
    for d in history:
        current = "  <- current" if view.rating and d.seq == view.rating.seq else ""
        converted = ""
        if d.fx_rate_e10 is not None and d.plan_cost_micros is not None:
            converted = (f" = {format_amount(d.plan_cost_micros)} {d.plan_currency} at "
                         f"{d.plan_currency}->{d.currency} {fx_text(d.fx_rate_e10, d.fx_inverse)}")
        click.echo(f"  #{d.seq} {_iso(d.decided_at)} plan {d.plan_name or '-'} prefix {d.prefix or '-'} "
                   f"rate {format_amount(d.rate_micros)}{(' ' + d.plan_currency) if d.plan_currency else ''}/min "
                   f"billed {d.billed_seconds}s cost {format_amount(d.cost_micros)}"
                   f"{(' ' + d.currency) if d.currency else ''}{converted} ({d.reason}){current}")
        _route_line(d)
    if levels:
        click.echo("levels above (each reseller charged its seller's price for the same call):")
    for d in levels:
        click.echo(f"  level {d.level} {d.level_account_id or '-'} pays {d.tenant or '-'}: plan {d.plan_name or '-'} "
                   f"prefix {d.prefix or '-'} rate {format_amount(d.rate_micros)}"
                   f"{(' ' + d.plan_currency) if d.plan_currency else ''}/min billed {d.billed_seconds}s cost "
                   f"{format_amount(d.cost_micros)}{(' ' + d.currency) if d.currency else ''} (#{d.seq} {d.reason})")
        _route_line(d)


def _route_line(d: DecisionView) -> None:
    """The buy side, on the decision of the level the operator sells to (DESIGN §10)."""
    if d.carrier and d.buy_cost_micros is not None and d.margin_micros is not None:
        click.echo(f"     carried by {d.carrier}: buys {d.buy_prefix or '-'} at {format_amount(d.buy_rate_micros)}"
                   f"/min, billed {d.buy_billed_seconds}s, cost {format_amount(d.buy_cost_micros)}, margin "
                   f"{format_amount(d.margin_micros)}{(' ' + d.plan_currency) if d.plan_currency else ''}")


@cdrs.command()
@filter_options
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="File to write (default: standard output).")
@click.option("--legs", "with_legs", is_flag=True, help="CSV: add a `legs` column, every leg as JSON.")
@click.pass_context
@handle_errors
def export(ctx: click.Context, /, fmt: str, output: str, with_legs: bool, **filters: Any) -> None:
    """Every matching call, streamed (bounded memory, for millions of calls).

    CSV has one line per call with its current rating, the caller's leg (a_*) and the billed leg
    (b_*); JSON lines have every leg and the current rating nested."""
    engine, where = app(ctx).engine(), _filter(filters)
    if fmt == "csv" and not with_legs and server_csv_supported(engine):
        # PostgreSQL writes the same CSV itself: no Python work per row.
        def write_bytes(out: IO[bytes]) -> int:
            return copy_csv(engine, where, out)

        if output == "-":
            count = write_bytes(sys.stdout.buffer)
        else:
            try:
                with open(output, "wb") as binary:
                    count = write_bytes(binary)
            except OSError as exc:
                fail(f"{output}: cannot write the export: {exc.strerror}")
        click.echo(f"exported {count} calls", err=True)
        return
    cdrs = iter_flat(engine, where)

    def write(out: IO[str]) -> int:
        return write_csv(cdrs, out, with_legs=with_legs) if fmt == "csv" else write_jsonl(cdrs, out)

    if output == "-":
        count = write(sys.stdout)
    else:
        try:
            with open(output, "w", encoding="utf-8", newline="") as handle:
                count = write(handle)
        except OSError as exc:
            fail(f"{output}: cannot write the export: {exc.strerror}")
    click.echo(f"exported {count} calls", err=True)


def _reconcile_json(line: ReconcileLine) -> dict[str, Any]:
    return {"call_id": line.call_id, "account_id": line.account_id, "started_at": line.started_at,
            "disposition": line.disposition, "pbx_billsec": line.pbx_billsec,
            "charged_seconds": line.charged_seconds, "expected_seconds": line.expected_seconds,
            "increment": line.increment, "difference": line.difference, "status": line.status}


def _minutes(seconds: int) -> str:
    """Seconds as minutes with 6 decimals, exact when they are (else rounded half up)."""
    micro_minutes = (seconds * 1_000_000 * 2 + 60) // 120
    return format_amount(micro_minutes)


@cdrs.command(name="margin")
@click.option("--by", "by", type=click.Choice(["tenant", "carrier", "destination", "account", "day"]),
              default="tenant", show_default=True,
              help="tenant: each reseller's margin (DESIGN §11); carrier, destination, account, day: the "
                   "wholesale margin of routed calls, sell price against the carriers' buy cost (DESIGN §10).")
@click.option("--since", callback=_instant, metavar="ISO8601", help="Calls started at or after (UTC if no offset).")
@click.option("--until", callback=_instant, metavar="ISO8601", help="Calls started before.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def margin_command(ctx: click.Context, by: str, since: datetime | None, until: datetime | None,
                   as_json: bool) -> None:
    """Per reseller tenant: calls, minutes, revenue (what its customers paid it), cost (what it
    paid its parent for the same calls) and margin, in its currency (DESIGN §11). With --by
    carrier, destination, account or day: the routed calls' revenue (the sell price), cost (what
    the carrier that carried each call bills, by its own increments) and margin, per currency."""
    from agent.adapters.cdr.margin import margin_by_route, margin_by_tenant

    check_range(since, until)
    if by != "tenant":
        _route_margin(by, margin_by_route(app(ctx).engine(), by, since=since, until=until), as_json)
        return
    rows = margin_by_tenant(app(ctx).engine(), since=since, until=until)
    listed = []
    for row in rows:
        item: dict[str, Any] = {
            "tenant": row.tenant, "currency": row.currency, "calls": row.calls, "seconds": row.seconds,
            "minutes": _minutes(row.seconds), "revenue": format_amount(row.revenue_micros),
            "cost": format_amount(row.cost_micros), "margin": format_amount(row.margin_micros)}
        if row.other_revenue:
            item["other_revenue"] = {cur: format_amount(v) for cur, v in sorted(row.other_revenue.items())}
        listed.append(item)
    if as_json:
        print_json(listed)
        return
    _margin_table("tenant", listed, "no reseller tenants")


def _margin_table(key: str, listed: list[dict[str, Any]], empty: str) -> None:
    """Margin rows as a table: the key, calls, minutes and the money in each row's currency."""
    if not listed:
        click.echo(empty)
        return
    click.echo(f"{key:<20} {'calls':>7} {'minutes':>14} {'revenue':>16} {'cost':>16} {'margin':>16}")
    for item in listed:
        cur = item["currency"]
        click.echo(f"{item[key]:<20} {item['calls']:>7} {item['minutes']:>14} {item['revenue'] + ' ' + cur:>16} "
                   f"{item['cost'] + ' ' + cur:>16} {item['margin'] + ' ' + cur:>16}")
        for other, amount in item.get("other_revenue", {}).items():
            click.echo(f"{'':<20} also {amount} {other} in another currency (not in the margin)")


def _route_margin(by: str, rows: list[Any], as_json: bool) -> None:
    listed = [{by: row.key, "currency": row.currency, "calls": row.calls, "seconds": row.seconds,
               "minutes": _minutes(row.seconds), "revenue": format_amount(row.revenue_micros),
               "cost": format_amount(row.cost_micros), "margin": format_amount(row.margin_micros)} for row in rows]
    if as_json:
        print_json(listed)
        return
    _margin_table(by, listed, "no routed calls (carriers carry calls once `billing-agent carriers` defines them)")


@cdrs.command(name="reconcile")
@click.option("--since", callback=_instant, required=True, metavar="ISO8601", help="Calls started at or after.")
@click.option("--until", callback=_instant, metavar="ISO8601", help="Calls started before.")
@click.option("--account", "account_id", help="Only this account.")
@click.option("--node", help="Only calls of this agent node.")
@click.option("--all", "show_all", is_flag=True, help="List every call, not only the flagged ones.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def reconcile_command(ctx: click.Context, since: datetime, until: datetime | None, account_id: str | None,
                      node: str | None, show_all: bool, as_json: bool) -> None:
    """Compare the PBX's billed seconds with the charged seconds; flag differences beyond one increment.

    Exits 1 when a call is flagged (for cron and monitoring)."""
    where = CdrFilter(account_id=account_id, since=since, until=until, node=node)
    summary = ReconcileSummary()
    listed: list[dict[str, Any]] = []
    for line in reconcile(app(ctx).engine(), where):
        summary.add(line)
        if not (line.flagged or show_all):
            continue
        if as_json:
            listed.append(_reconcile_json(line))
        else:
            diff = "-" if line.difference is None else f"{line.difference:+d}"
            click.echo(f"{line.status:<13} {line.call_id}  account {line.account_id}  pbx {line.pbx_billsec}s  "
                       f"charged {line.charged_seconds}s  expected {line.expected_seconds}s  diff {diff}s  "
                       f"increment {line.increment}s")
    totals = {"checked": summary.checked, "flagged": summary.flagged, "pbx_seconds": summary.pbx_seconds,
              "charged_seconds": summary.charged_seconds, "by_status": dict(sorted(summary.statuses.items()))}
    if as_json:
        print_json({"summary": totals, "calls": listed})
    else:
        click.echo(f"checked {summary.checked} calls: {summary.flagged} flagged; PBX billed "
                   f"{summary.pbx_seconds} s, charged {summary.charged_seconds} s")
    if summary.flagged:
        sys.exit(1)


def _quarantine_rows(engine: Any, limit: int) -> Iterator[dict[str, Any]]:
    from sqlalchemy import select

    from agent.adapters.sql.models import CdrQuarantine as Q

    with engine.connect() as conn:
        for row in conn.execute(select(Q.id, Q.call_id, Q.node, Q.reason, Q.created_at)
                                .order_by(Q.id.desc()).limit(limit)):
            yield {"id": row.id, "call_id": row.call_id, "node": row.node, "reason": row.reason,
                   "created_at": _iso(row.created_at)}


@cdrs.command()
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def quarantine(ctx: click.Context, limit: int, as_json: bool) -> None:
    """CDRs the database refused (newest first), with the reason; the full record is in
    ``cdr_quarantine.payload``."""
    rows = list(_quarantine_rows(app(ctx).engine(), limit))
    if as_json:
        print_json(rows)
        return
    for row in rows:
        click.echo(f"{row['created_at']}  {row['call_id'] or '?'}  node {row['node']}: {row['reason']}")
    if not rows:
        click.echo("no quarantined CDRs")


@cdrs.command()
@click.option("--spool-dir", help="The spool folder (default: cdr.spool_dir of the config).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def replay(ctx: click.Context, spool_dir: str | None, as_json: bool) -> None:
    """Write what the local spool holds to SQL now (a stopped agent's leftovers).

    A running agent replays its spool by itself and holds its lock; this command then refuses."""
    from agent.adapters.cdr.factory import make_cdr_pipeline, spool_path
    from agent.services.cdr_pipeline import CdrStoreUnavailable, SpoolError

    context = app(ctx)
    folder = spool_path(context.config, spool_dir)
    if not folder.is_dir():
        fail(f"{folder}: no CDR spool folder here (cdr.spool_dir, or --spool-dir)")
    try:
        pipeline = make_cdr_pipeline(context.config, context.engine(), spool_dir=str(folder))
    except SpoolError as exc:
        fail(str(exc))
    try:
        report = pipeline.replay_now()
    except CdrStoreUnavailable as exc:
        fail(f"database unreachable: {exc}; {pipeline.spool.backlog_bytes()} bytes stay in {folder}")
    finally:
        pipeline.spool.close()
    data = {"spool": str(folder), "written": report.written, "quarantined": report.rejected,
            "quarantined_locally": report.quarantined_locally, "damaged_regions": report.damaged_regions,
            "batches": report.batches, "backlog_bytes": report.backlog_bytes}
    if as_json:
        print_json(data)
        return
    click.echo(f"{folder}: {report.written} CDRs written to SQL in {report.batches} batches, "
               f"{report.rejected} quarantined ({report.quarantined_locally} in {folder / 'quarantine'}), "
               f"{report.damaged_regions} damaged spool regions quarantined; {report.backlog_bytes} bytes left")
