"""``billing-agent calls``: every live call on every node, and cutting one from anywhere."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click
import gevent

from agent.adapters.balance import make_balance_store
from agent.adapters.sql.live_calls import command_result, is_stale, live_call_rows, node_states, request_hangup
from agent.adapters.sql.models import utcnow
from agent.cli.common import app, fail, handle_errors, print_json
from agent.core.balance import LiveCall
from agent.core.errors import BillingError
from agent.core.money import format_amount


@click.group()
def calls() -> None:
    """Live calls, from the shared database and balance store."""


def _seconds_since(moment: datetime | None, now: datetime) -> int | None:
    return None if moment is None else max(0, int((now - moment).total_seconds()))


def gather_live_calls(ctx: click.Context) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Calls (facts from ``live_calls`` joined with the money from the balance store) and nodes."""
    context = app(ctx)
    engine = context.engine()
    now = utcnow()
    publish_seconds = context.config.daemon.publish_seconds
    nodes = {n.node: n for n in node_states(engine)}
    store = make_balance_store(context.config, engine)
    try:
        money: dict[str, LiveCall] = {c.call_id: c for c in store.live_calls()}
        available: dict[str, int] = {}
        out = []
        for row in live_call_rows(engine):
            if row.account_id not in available:
                try:
                    available[row.account_id] = store.account_state(row.account_id).available_micros
                except BillingError:
                    available[row.account_id] = 0
            held = money.get(row.call_id)
            node = nodes.get(row.node)
            out.append({
                "call_id": row.call_id, "node": row.node, "pbx": row.pbx, "account": row.account_id,
                "destination": row.destination, "caller": row.caller,
                "state": "answered" if row.answered_at else "dialling",
                "answered_seconds": _seconds_since(row.answered_at, now),
                "spent": format_amount(held.debited_micros) if held else None,
                "reserved": format_amount(held.reserved_micros) if held else None,
                "account_available": format_amount(available[row.account_id]),
                "cut_in_seconds": (max(0, int((row.cut_at - now).total_seconds())) if row.cut_at else None),
                "node_stale": node is None or is_stale(node.heartbeat_at, now, publish_seconds),
            })
    finally:
        store.close()
    node_list = [{"node": n.node, "host": n.host, "pid": n.pid, "pbx": n.pbx, "live_calls": n.live_calls,
                  "heartbeat_age_seconds": _seconds_since(n.heartbeat_at, now),
                  "state": "stopped" if n.stopped_at else ("stale" if is_stale(n.heartbeat_at, now, publish_seconds)
                                                           else "up")}
                 for n in nodes.values()]
    return out, node_list


@calls.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def list_calls(ctx: click.Context, as_json: bool) -> None:
    """Every live call on every node: account, destination, answered for, spent, money left."""
    live, nodes = gather_live_calls(ctx)
    if as_json:
        print_json({"calls": live, "nodes": nodes})
        return
    if not live:
        click.echo("no live calls")
    else:
        click.echo(f"{'CALL':<28} {'NODE':<10} {'ACCOUNT':<12} {'DESTINATION':<16} {'STATE':<9} "
                   f"{'ANSWERED':>8} {'SPENT':>12} {'AVAILABLE':>12} {'CUT IN':>7}")
        for c in live:
            answered = f"{c['answered_seconds']}s" if c["answered_seconds"] is not None else "-"
            cut = f"{c['cut_in_seconds']}s" if c["cut_in_seconds"] is not None else "-"
            node = c["node"] + ("?" if c["node_stale"] else "")
            click.echo(f"{c['call_id']:<28} {node:<10} {c['account']:<12} {c['destination']:<16} "
                       f"{c['state']:<9} {answered:>8} {c['spent'] or '-':>12} {c['account_available']:>12} "
                       f"{cut:>7}")
    stale = [n["node"] for n in nodes if n["state"] == "stale"]
    if stale:
        click.echo(f"warning: no heartbeat from node(s) {', '.join(stale)}: their calls may be stale "
                   "(marked ?)", err=True)


@calls.command("hangup")
@click.argument("call_id")
@click.option("--reason", default="operator request", show_default=True, help="Logged with the cut.")
@click.option("--wait", "wait_seconds", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Wait this long for the owning node to carry the hangup out (0: do not wait).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def hangup(ctx: click.Context, call_id: str, reason: str, wait_seconds: float, as_json: bool) -> None:
    """Cut a live call, whichever node supervises it (billing stops when the PBX confirms)."""
    engine = app(ctx).engine()
    command_id, node = request_hangup(engine, call_id, reason)
    done_at, result = None, ""
    waited = 0.0
    while waited < wait_seconds:
        done_at, result = command_result(engine, command_id)
        if done_at is not None:
            break
        gevent.sleep(0.2)
        waited += 0.2
    outcome = {"call_id": call_id, "node": node, "command_id": command_id, "done": done_at is not None,
               "result": result or "queued"}
    if as_json:
        print_json(outcome)
    elif done_at is not None:
        click.echo(f"{call_id}: {result} by {node}")
    else:
        click.echo(f"{call_id}: hangup queued for node {node} (not picked up within {wait_seconds:.0f}s; "
                   "is the node running?)")
    if wait_seconds and done_at is None:
        fail(f"node {node} did not carry out the hangup of {call_id} within {wait_seconds:.0f}s", 3)
