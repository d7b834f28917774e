"""``billing-agent bundles``: free-minute bundles (DESIGN §9): define, list, delete, grant, show.

A bundle gives an account N seconds per period to the numbers starting with one of its
prefixes (the numbers as the account's plan rates them: digits, without ``+`` or the plan's
international prefix). Calls draw on it before money, the daemon counts the seconds; these
commands are the operator's side. Periods are read in the timezone of the account's rate plan.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click

from agent.adapters.sql import bundles_admin as repo
from agent.cli.balance_cache import redis_store, store_bundle_periods
from agent.cli.common import app, handle_errors, print_json
from agent.core.balance import StoreUnavailable
from agent.core.bundles import BundleDef, PeriodKind, PeriodState, parse_prefixes
from agent.core.errors import InvalidInput
from agent.core.rating import OPEN_END_MS

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# ------------------------------------------------------------------------------- helpers


def read_prefixes(value: str) -> tuple[str, ...]:
    """``--prefixes``: a file (one or more prefixes a line, ``#`` comments) or a comma list."""
    path = Path(value)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{value}: cannot read the prefix file ({exc})") from None
        return parse_prefixes(text, str(path))
    try:
        return parse_prefixes(value.replace("\n", " "), "--prefixes")
    except InvalidInput as exc:
        if "," not in value and not value.strip().lstrip("+").isdigit():
            raise InvalidInput(f"{exc} (and there is no file {value!r})") from None
        raise


def _instant_text(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """An ISO 8601 date or timestamp; naive values are read in the account's timezone later."""
    if value is None:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or timestamp (e.g. 2026-02-01, "
                                 "2026-02-01T00:00:00+01:00 or 2026-02-01T00:00:00Z)") from None


def in_zone(moment: datetime | None, timezone: str) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return None if moment is None else moment.astimezone(UTC)
    return moment.replace(tzinfo=ZoneInfo(timezone)).astimezone(UTC)


def local_iso(ms: int | None, timezone: str) -> str | None:
    if ms is None or ms >= OPEN_END_MS:
        return None
    return (_EPOCH + timedelta(milliseconds=ms)).astimezone(ZoneInfo(timezone)).isoformat(timespec="seconds")


def _warn(lines: list[str] | tuple[str, ...]) -> None:
    for line in lines:
        click.echo(f"warning: {line}", err=True)


def bundle_json(view: repo.BundleView) -> dict[str, Any]:
    return {"id": view.id, "name": view.name, "seconds": view.seconds, "period": view.period.value,
            "anchor": None if view.period is PeriodKind.ONCE else view.anchor, "rollover": view.rollover,
            "prefixes": list(view.prefixes), "grants": view.grants,
            "created_at": view.created_at.isoformat(timespec="seconds"),
            "deleted_at": None if view.deleted_at is None else view.deleted_at.isoformat(timespec="seconds")}


def _period_words(view: repo.BundleView) -> str:
    if view.period is PeriodKind.MONTH:
        return f"month from day {view.anchor}" + (" (or last)" if view.anchor > 28 else "")
    if view.period is PeriodKind.WEEK:
        return f"week from {['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'][view.anchor - 1]}"
    return "once (the grant's validity)"


# ------------------------------------------------------------------------------ commands


@click.group()
def bundles() -> None:
    """Free-minute bundles: seconds per period to a destination group, used before money."""


@bundles.command()
@click.argument("name")
@click.option("--seconds", type=click.IntRange(min=1), required=True, help="Allowance per period, in seconds.")
@click.option("--prefixes", "prefixes_arg", required=True, metavar="FILE|LIST",
              help="Destination prefixes: a comma list (4915,4916,+4917) or a file with one or more per line "
                   "(# starts a comment). Digits only, as the plan rates numbers (a leading + is dropped).")
@click.option("--period", type=click.Choice([k.value for k in PeriodKind]), default="month", show_default=True,
              help="month: from the anchor day of each month; week: from the anchor weekday; once: one period, "
                   "the grant's validity.")
@click.option("--anchor", type=int, metavar="DAY",
              help="month: the day the period starts, 1-31; 29, 30 or 31 mean the month's last day in shorter "
                   "months (31: 28/29 February, 30 April ...). week: ISO weekday, 1 = Monday ... 7 = Sunday. "
                   "Default 1. Read in the timezone of each account's rate plan.")
@click.option("--rollover", is_flag=True,
              help="What a period leaves (at most one allowance) is added to the next one.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def create(ctx: click.Context, name: str, seconds: int, prefixes_arg: str, period: str, anchor: int | None,
           rollover: bool, as_json: bool) -> None:
    """Define the bundle NAME.

    Warns (does not fail) when a prefix matches no rate in any plan, or names the plans in
    which none of its prefixes matches a rate."""
    kind = PeriodKind(period)
    if kind is PeriodKind.ONCE and anchor is not None:
        raise InvalidInput("--anchor: a bundle of --period once has no anchor (its period is the grant's validity)")
    prefixes = read_prefixes(prefixes_arg)
    definition = BundleDef(name, seconds, prefixes, kind, 1 if anchor is None else anchor, rollover)
    with app(ctx).transaction() as session:
        view = repo.create_bundle(session, definition)
        coverage = repo.prefix_coverage(session, view.prefixes)
    warnings = coverage.warnings(name)
    _warn(warnings)
    if as_json:
        print_json({**bundle_json(view), "warnings": warnings})
    else:
        click.echo(f"created bundle {view.name}: {view.seconds} s per {_period_words(view)}"
                   f"{', rollover' if view.rollover else ''}, {len(view.prefixes)} prefix(es)")


@bundles.command(name="list")
@click.option("--deleted", "include_deleted", is_flag=True, help="Include deleted bundles.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def list_(ctx: click.Context, include_deleted: bool, as_json: bool) -> None:
    """List bundles with their prefixes and how many grants each has."""
    with app(ctx).transaction() as session:
        views = repo.list_bundles(session, include_deleted=include_deleted)
    if as_json:
        print_json([bundle_json(v) for v in views])
        return
    click.echo(f"{'NAME':<20} {'SECONDS':>9} {'PERIOD':<38} {'GRANTS':>6}  PREFIXES")
    for v in views:
        shown = ",".join(v.prefixes[:8]) + (f",... ({len(v.prefixes)})" if len(v.prefixes) > 8 else "")
        period = _period_words(v) + (", rollover" if v.rollover else "")
        deleted = f"  (deleted {v.deleted_at.isoformat(timespec='seconds')})" if v.deleted_at else ""
        click.echo(f"{v.name:<20} {v.seconds:>9} {period:<38} {v.grants:>6}  {shown}{deleted}")


@bundles.command()
@click.argument("name")
@click.pass_context
@handle_errors
def delete(ctx: click.Context, name: str) -> None:
    """Retire the bundle NAME: no new grant, no call draws on it any more; its grants and usage
    stay as history. Refused while a live call holds seconds of it (try again once it ends)."""
    context = app(ctx)
    with context.transaction() as session:
        bundle = repo.get_bundle(session, name)
        by_account = repo.grants_by_account(session, bundle.id)
    others = _shared_store_holds(ctx, by_account)
    with context.transaction() as session:
        view = repo.delete_bundle(session, name, other_holds=others)
    click.echo(f"deleted bundle {view.name} ({view.grants} grant(s) kept as history); the daemons stop "
               "drawing on it within seconds")


def _shared_store_holds(ctx: click.Context, by_account: dict[str, list[int]]) -> list[str]:
    """With Redis, the live holds are there: each period of the bundle's grants with seconds
    reserved by a live call. A Redis that cannot answer refuses the delete (it cannot be checked)."""
    store = redis_store(ctx)
    if store is None or not by_account:
        if store is not None:
            store.close()
        return []
    reader = getattr(store, "bundle_periods", None)
    lines: list[str] = []
    try:
        if reader is None:  # a Redis store without bundle periods holds no bundle seconds
            return []
        for account_id, grant_ids in sorted(by_account.items()):
            periods: dict[tuple[int, int], PeriodState] = reader(account_id)
            for (grant_id, start), state in sorted(periods.items()):
                if grant_id in grant_ids and state.reserved_s > 0:
                    lines.append(f"live calls of account {account_id} hold {state.reserved_s} s of grant "
                                 f"{grant_id} (period from {start} ms, Redis)")
    except StoreUnavailable as exc:
        raise InvalidInput(f"cannot check the live calls in Redis ({exc}): nothing deleted, try again "
                           "once Redis answers") from None
    finally:
        store.close()
    return lines


def _local(moment: datetime | None, timezone: str) -> str | None:
    return None if moment is None else moment.astimezone(ZoneInfo(timezone)).isoformat(timespec="seconds")


def grant_json(grant: repo.GrantView, timezone: str) -> dict[str, Any]:
    """The validity as instants with the offset of the account's timezone."""
    return {"grant": grant.id, "account": grant.account_id, "bundle": grant.bundle, "reference": grant.reference,
            "valid_from": _local(grant.valid_from, timezone), "valid_until": _local(grant.valid_until, timezone)}


@bundles.command()
@click.argument("account_id")
@click.argument("name")
@click.option("--from", "valid_from", callback=_instant_text, metavar="ISO8601",
              help="Valid from (default now). A date or a time without an offset is read in the timezone of "
                   "the account's rate plan.")
@click.option("--until", "valid_until", callback=_instant_text, metavar="ISO8601",
              help="Valid until (excluded; default: open-ended).")
@click.option("--reference", help="Order reference; the same reference grants once (like top-ups).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def grant(ctx: click.Context, account_id: str, name: str, valid_from: datetime | None, valid_until: datetime | None,
          reference: str | None, as_json: bool) -> None:
    """Grant the bundle NAME to ACCOUNT_ID (idempotent per --reference).

    Refused: an unknown account or bundle, a deleted bundle, and a grant of the same bundle to
    the same account whose validity overlaps another's (the error names it)."""
    with app(ctx).transaction() as session:
        _, timezone = repo.account_timezone(session, account_id)
        outcome = repo.grant_bundle(session, account_id, name, valid_from=in_zone(valid_from, timezone),
                                    valid_until=in_zone(valid_until, timezone), reference=reference)
    _warn(outcome.warnings)
    g = outcome.grant
    if as_json:
        print_json({**grant_json(g, timezone), "created": outcome.created, "warnings": list(outcome.warnings)})
    elif outcome.created:
        click.echo(f"granted bundle {g.bundle} to {g.account_id}: grant {g.id}, valid "
                   f"{_local(g.valid_from, timezone)} to {_local(g.valid_until, timezone) or 'open-ended'} "
                   f"({timezone}), reference {g.reference}")
    else:
        click.echo(f"already granted: reference {g.reference} is grant {g.id} of bundle {g.bundle} to "
                   f"{g.account_id}; nothing changed")


def figures_json(f: repo.GrantFigures, timezone: str) -> dict[str, Any]:
    g = f.grant
    return {
        "grant": g.grant_id, "bundle": g.bundle.name, "reference": g.reference, "status": f.status,
        "period": g.bundle.period.value, "prefixes": list(g.bundle.prefixes),
        "valid_from": local_iso(g.valid_from_ms, timezone), "valid_until": local_iso(g.valid_until_ms, timezone),
        "period_start": local_iso(f.period_start_ms, timezone), "period_end": local_iso(f.period_end_ms, timezone),
        "resets_at": local_iso(f.resets_at_ms, timezone),
        "granted_seconds": f.granted_s, "rollover_seconds": f.rollover_s, "used_seconds": f.used_s,
        "reserved_seconds": f.reserved_s, "left_seconds": f.left_s, "opened": f.opened,
    }


def account_figures(ctx: click.Context, account_id: str, at: datetime | None, *, include_ended: bool = False
                    ) -> tuple[str, str, list[repo.GrantFigures], str]:
    """The account's plan, timezone, each grant's figures at ``at`` (default now), and where the
    counters came from (the shared store when Redis is configured, else SQL)."""
    moment = at or datetime.now(UTC)
    with app(ctx).transaction() as session:
        plan, timezone = repo.account_timezone(session, account_id)
        grants = repo.account_grants(session, account_id, at=moment, include_ended=include_ended,
                                     include_deleted=include_ended)
        periods = repo.sql_periods(session, account_id)
    live, source = store_bundle_periods(ctx, account_id) if grants else (None, "sql")
    if live is not None:
        periods.update(live)
    at_ms = (moment - _EPOCH) // timedelta(milliseconds=1)
    figures = [repo.grant_figures(g.grant, timezone, at_ms, periods, deleted=g.deleted_at is not None)
               for g in grants]
    return plan, timezone, figures, source


@bundles.command()
@click.argument("account_id")
@click.option("--at", "at", callback=_instant_text, metavar="ISO8601",
              help="Show the periods in force at this instant (default now; without an offset: the account's "
                   "timezone).")
@click.option("--all", "include_ended", is_flag=True, help="Also grants that ended and grants of deleted bundles.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def show(ctx: click.Context, account_id: str, at: datetime | None, include_ended: bool, as_json: bool) -> None:
    """Each bundle grant of ACCOUNT_ID: its period [start, end) in the account's timezone,
    seconds granted, used, reserved by live calls, left, and when it resets.

    A period no call has drawn on yet shows its whole allowance (plus, with rollover, what the
    period before left, as it would be carried if a call drew on it now)."""
    if at is not None and at.tzinfo is None:
        with app(ctx).transaction() as session:
            at = in_zone(at, repo.account_timezone(session, account_id)[1])
    plan, timezone, figures, source = account_figures(ctx, account_id, at, include_ended=include_ended)
    if as_json:
        print_json({"account": account_id, "plan": plan, "timezone": timezone, "source": source,
                    "grants": [figures_json(f, timezone) for f in figures]})
        return
    click.echo(f"account {account_id}, plan {plan}, periods in {timezone}")
    if not figures:
        click.echo("no bundle grant" + ("" if include_ended else " in force or to come (--all shows ended ones)"))
        return
    click.echo(f"{'GRANT':>5} {'BUNDLE':<16} {'PERIOD':<53} {'GRANTED':>8} {'USED':>8} {'RESERVED':>8} "
               f"{'LEFT':>8}  RESETS AT")
    for f in figures:
        data = figures_json(f, timezone)
        span = f"[{data['period_start']}, {data['period_end'] or 'open-ended'})"
        resets = data["resets_at"] or ("never (one period)" if f.grant.bundle.period is PeriodKind.ONCE
                                       else "never (the grant ends)")
        notes = []
        if f.status != "active":
            notes.append(f.status)
        if f.rollover_s:
            notes.append(f"{f.rollover_s} s rolled over" + ("" if f.opened else " if used now"))
        if not f.opened:
            notes.append("not used yet")
        click.echo(f"{f.grant.grant_id:>5} {f.grant.bundle.name:<16} {span:<53} {f.granted_s:>8} {f.used_s:>8} "
                   f"{f.reserved_s:>8} {f.left_s:>8}  {resets}" + (f"  ({'; '.join(notes)})" if notes else ""))
