"""Redis key layout of the balance store.

Every key of one account carries the hash tag ``{ID}``, so that they all live in one Redis
Cluster slot and one Lua script can check and change them atomically::

    {prefix}acct:{ID}:bal          hash: balance, credit, reserved, status, max_calls, plan,
                                   currency, overrun (total), loaded (ms); the spend caps
                                   cap_call, cap_day, cap_month ('' = none) and tz, the
                                   timezone of the account's plan (DESIGN §8)
    {prefix}acct:{ID}:live         zset: call id -> expires ms (open reservations, every node)
    {prefix}acct:{ID}:unposted     set: closed calls whose ledger entries are not yet in SQL
    {prefix}acct:{ID}:call:{CALL}  hash: one call's reservation and idempotency record (with its
                                   bundle holds: slots ``bs1..``, held ``bh1..``, used ``bu1..``)
    {prefix}acct:{ID}:bp:{G}:{S}   hash: bundle period of grant G starting at S ms (DESIGN §9):
                                   granted, used, reserved (seconds), allowance, carry, end
    {prefix}acct:{ID}:bundles      set: "G:S" of every period above (the account's view)
    {prefix}acct:{ID}:bundles:unposted  set: "G:S" of periods whose opening is not in SQL yet
    {prefix}acct:{ID}:spend:d:{S}  hash: spend caps' counter of the local day starting at S ms:
    {prefix}acct:{ID}:spend:m:{S}  (month) spent (charges of the calls that started in it),
                                   held (reserved + debited of its open calls); only for calls
                                   authorized while the account had a cap (their call hash has
                                   sd and sm); they expire a few days (a day) / ~40 days (a
                                   month) after their period

Two keys outside any account are only hints, never read by a script (so no script needs keys
of two slots): ``{prefix}calls:index`` (zset "ID\\x1fCALL" -> when the sweeper should look at
the call; an entry is added before a call can exist and removed only once it is closed and in
the ledger) and ``{prefix}call:{CALL}`` (the call's account, for steps that name only the call).
The index also holds "ID\\x1f\\x1e" while the account may have bundle period openings that SQL
does not have yet (``periods_member``: the sweeper writes them).
"""

from __future__ import annotations

from dataclasses import dataclass

SEPARATOR = "\x1f"  # not printable: cannot occur in an account id
PERIODS_MARK = "\x1e"  # not printable: cannot be a call id; the index entry of an account's periods


@dataclass(frozen=True, slots=True)
class AccountKeys:
    account: str
    live: str
    unposted: str
    call_prefix: str
    periods: str  # set of "G:S"
    periods_unposted: str  # set of "G:S" whose opening SQL does not have yet
    period_prefix: str  # + "G:S" = one period's hash
    spend_prefix: str  # + "d:S" / "m:S" = one day's / month's spend counter

    def period(self, grant_id: int, period_start_ms: int) -> str:
        return f"{self.period_prefix}{grant_id}:{period_start_ms}"

    def call(self, call_id: str) -> str:
        return self.call_prefix + call_id

    def spend(self, kind: str, start_ms: int) -> str:
        """A spend counter: kind 'day' or 'month'."""
        return f"{self.spend_prefix}{kind[0]}:{start_ms}"


class KeySpace:
    def __init__(self, prefix: str = "") -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"redis.key_prefix {prefix!r} must not contain braces (they select the hash slot)")
        self.prefix = prefix
        self.index = f"{prefix}calls:index"

    def of(self, account_id: str) -> AccountKeys:
        base = f"{self.prefix}acct:{{{account_id}}}:"
        return AccountKeys(base + "bal", base + "live", base + "unposted", base + "call:", base + "bundles",
                           base + "bundles:unposted", base + "bp:", base + "spend:")

    def call_account(self, call_id: str) -> str:
        return f"{self.prefix}call:{call_id}"

    @staticmethod
    def member(account_id: str, call_id: str) -> str:
        return f"{account_id}{SEPARATOR}{call_id}"

    @staticmethod
    def periods_member(account_id: str) -> str:
        return f"{account_id}{SEPARATOR}{PERIODS_MARK}"

    @staticmethod
    def split(member: str) -> tuple[str, str]:
        account_id, _, call_id = member.partition(SEPARATOR)
        return account_id, call_id
