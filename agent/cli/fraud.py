"""``billing-agent fraud`` and ``billing-agent alerts``: check a rules file; list and acknowledge
the alerts (the append-only ``alerts`` table: fraud rules, low balance, balance exhausted)."""

from __future__ import annotations

from typing import Any

import click

from agent.adapters.fraud_rules_file import RulesFileError, load_rules
from agent.adapters.sql.fraud import AlertView, ack_alert, list_alerts
from agent.cli.cdrs import _instant
from agent.cli.common import app, fail, handle_errors, print_json
from agent.core.fraud import MONEY_KINDS
from agent.core.fraud_rules import RuleKind
from agent.core.money import format_amount


@click.group()
def fraud() -> None:
    """Fraud rules (fraud.rules_file)."""


@fraud.group()
def rules() -> None:
    """The rules file."""


@rules.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def check(path: str, as_json: bool) -> None:
    """Check a rules file as the daemon loads it: every problem with its line and key; exit 1 on any."""
    try:
        rule_set = load_rules(path)
    except RulesFileError as exc:
        if as_json:
            print_json({"file": path, "ok": False, "errors": exc.errors})
        else:
            for error in exc.errors:
                click.echo(error, err=True)
        fail(f"{path}: {len(exc.errors)} problem(s); the daemon would refuse it", 1)
    listed = [{"name": r.name, "kind": r.kind.value, "group": r.group or None,
               "window_s": r.window_s or None, "threshold": _threshold(r.kind, r.threshold), "action": r.action.value,
               "deny": ("group" if r.deny_group_only else "all") if r.action.value == "deny" else None,
               "when": r.condition.source if r.condition else None} for r in rule_set.rules]
    if as_json:
        print_json({"file": path, "ok": True, "rules": listed,
                    "groups": {name: len(prefixes) for name, prefixes in sorted(rule_set.groups.items())}})
        return
    for name, prefixes in sorted(rule_set.groups.items()):
        click.echo(f"group {name}: {len(prefixes)} prefixes")
    for r in listed:
        scope = f" to {r['group']}" if r["group"] else ""
        window = f" in {r['window_s']}s" if r["window_s"] else ""
        when = f" when {r['when']}" if r["when"] else ""
        deny = f" ({r['deny']})" if r["deny"] else ""
        click.echo(f"rule {r['name']}: {r['kind']}{scope}{window} > {r['threshold']} -> {r['action']}{deny}{when}")
    click.echo(f"{path}: OK, {len(listed)} rules")


def _threshold(kind: RuleKind, value: int) -> str:
    if kind is RuleKind.SPEND:
        return format_amount(value)
    if kind is RuleKind.SHORT_CALLS:
        return f"{value}%"
    return str(value)


@click.group()
def alerts() -> None:
    """Alerts: fraud rules that fired, low balance, balance exhausted."""


def _alert_json(a: AlertView) -> dict[str, Any]:
    def show(value: int) -> int | str:
        return format_amount(value) if a.kind in MONEY_KINDS else value

    return {"id": a.id, "at": a.created_at.isoformat(), "node": a.node, "account": a.account_id, "rule": a.rule,
            "kind": a.kind, "figure": show(a.figure), "threshold": show(a.threshold), "window_s": a.window_s,
            "action": a.action, "call_id": a.call_id, "destination": a.destination, "detail": a.detail,
            "acked_at": a.acked_at.isoformat() if a.acked_at else None}


@alerts.command("list")
@click.option("--since", callback=_instant, metavar="ISO8601", help="Alerts raised at or after (UTC if no offset).")
@click.option("--account", "account_id", help="Only this account.")
@click.option("--unacked", is_flag=True, help="Only alerts not acknowledged yet.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many (oldest first).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def list_(ctx: click.Context, since: Any, account_id: str | None, unacked: bool, limit: int | None,
          as_json: bool) -> None:
    """Alerts, oldest first: when, account, rule, the figure that crossed, the action taken."""
    found = [_alert_json(a) for a in list_alerts(app(ctx).engine(), since=since, account_id=account_id,
                                                 unacked=unacked, limit=limit)]
    if as_json:
        print_json(found)
        return
    if not found:
        click.echo("no alerts")
        return
    click.echo(f"{'ID':>6} {'AT':<26} {'ACCOUNT':<14} {'RULE':<18} {'ACTION':<10} {'ACK':<3} DETAIL")
    for a in found:
        click.echo(f"{a['id']:>6} {a['at'][:26]:<26} {a['account']:<14} {a['rule']:<18} {a['action']:<10} "
                   f"{'yes' if a['acked_at'] else 'no':<3} {a['detail']} (call {a['call_id'] or '-'})")


@alerts.command("ack")
@click.argument("alert_id", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def ack(ctx: click.Context, alert_id: int, as_json: bool) -> None:
    """Acknowledge alert ALERT_ID (once; the alert itself is never changed or deleted)."""
    view, changed = ack_alert(app(ctx).engine(), alert_id)
    if as_json:
        print_json({**_alert_json(view), "acknowledged_now": changed})
    elif changed:
        click.echo(f"alert {alert_id} acknowledged")
    else:
        at = view.acked_at.isoformat() if view.acked_at else "?"
        click.echo(f"alert {alert_id} was already acknowledged at {at}")
