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

Two kinds of keys outside the account's own are only hints, never read by a script on an
account's keys: the sweeper's index (zset "ID\\x1fCALL" -> when the sweeper should look at the
call; an entry is added before a call can exist and removed only once it is closed and in the
ledger) and ``{prefix}call:{CALL}`` (the call's account, for steps that name only the call).
The index also holds "ID\\x1f\\x1e" while the account may have bundle period openings that SQL
does not have yet (``periods_member``: the sweeper writes them).

On one Redis (or a Sentinel's master) the index is one key, ``{prefix}calls:index``. On a Redis
Cluster it is one key per slot, ``{prefix}calls:index:{T}``, where the tag T hashes to the
account's own slot (``slot_tag``): an account's index entry lives on the master of its other
keys, so a master that dies takes only its own accounts' steps with it. With one index key, every
authorize and settle needed the master that held it (issue 19). The sweeper reads the slots'
indexes master by master (store.py); the single key of earlier versions is still read there,
never written.
"""

from __future__ import annotations

from binascii import crc_hqx
from dataclasses import dataclass
from functools import cache

from redis.crc import key_slot

SLOTS = 16384

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


@cache
def _slot_tags() -> tuple[str, ...]:
    """For every cluster slot, the shortest hex string that hashes to it (CRC16 mod 16384, as
    Redis hashes a key's {tag}); found once per process (about 315,000 tries, a fraction of a second)."""
    tags: list[str | None] = [None] * SLOTS
    missing, candidate = SLOTS, 0
    while missing:
        tag = format(candidate, "x")
        slot = crc_hqx(tag.encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        candidate += 1
    return tuple(t for t in tags if t is not None)


def slot_tag(slot: int) -> str:
    return _slot_tags()[slot]


class KeySpace:
    def __init__(self, prefix: str = "", *, per_slot_index: bool = False) -> None:
        """``per_slot_index``: a Redis Cluster (the sweeper's index split by slot, see above)."""
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"redis.key_prefix {prefix!r} must not contain braces (they select the hash slot)")
        if not prefix.isprintable():  # nibbles.lua reads newline-separated fields (keys among them)
            raise ValueError(f"redis.key_prefix {prefix!r} must be printable characters")
        self.prefix = prefix
        self.index = f"{prefix}calls:index"  # the one index (one Redis); on a cluster, read only
        self.per_slot_index = per_slot_index

    def index_of(self, account_id: str) -> str:
        """The sweeper's index that holds the account's calls."""
        if not self.per_slot_index:
            return self.index
        return self.slot_index(key_slot(self.of(account_id).account.encode()))

    def slot_index(self, slot: int) -> str:
        return f"{self.prefix}calls:index:{{{slot_tag(slot)}}}"

    def of(self, account_id: str) -> AccountKeys:
        base = f"{self.prefix}acct:{{{account_id}}}:"
        return AccountKeys(base + "bal", base + "live", base + "unposted", base + "call:", base + "bundles",
                           base + "bundles:unposted", base + "bp:", base + "spend:")

    def call_account(self, call_id: str) -> str:
        return f"{self.prefix}call:{call_id}"

    def replication_marker(self, slot: int | None) -> str:
        """The replication id the sweeps last saw on the master that serves ``slot`` (a cluster:
        the master's first slot, so the key lives on that master and is replicated with its
        data), or on the one server (None), and when. See RedisBalanceStore._watch_replication."""
        return f"{self.prefix}replid" if slot is None else f"{self.prefix}replid:{{{slot_tag(slot)}}}"

    def rebuild_claim(self, replid: str, slot: int | None) -> str:
        """Taken by the one node that rebuilds the accounts after a master's new replication id."""
        if slot is None:
            return f"{self.prefix}rebuilt:{replid}"
        return f"{self.prefix}rebuilt:{{{slot_tag(slot)}}}:{replid}"

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
