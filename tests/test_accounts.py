"""Accounts and the ledger on every backend."""

import threading

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from agent.adapters.sql import accounts as repo
from agent.adapters.sql.engine import transaction
from agent.adapters.sql.models import LedgerEntry
from agent.adapters.sql.plans import create_plan
from agent.core.errors import Conflict, InvalidInput, NotFound


@pytest.fixture
def plan(sessions: sessionmaker[Session]) -> str:
    with transaction(sessions) as s:
        create_plan(s, "retail", currency="EUR")
    return "retail"


def test_opening_balance_is_a_ledger_entry(sessions: sessionmaker[Session], plan: str) -> None:
    with transaction(sessions) as s:
        view = repo.create_account(s, "alice", plan=plan, balance_micros=10_000_000)
    assert view.balance_micros == 10_000_000
    with transaction(sessions) as s:
        assert repo.ledger_sums(s) == {"alice": 10_000_000}


def test_topup_is_idempotent_per_reference(sessions: sessionmaker[Session], plan: str) -> None:
    with transaction(sessions) as s:
        repo.create_account(s, "alice", plan=plan)
    with transaction(sessions) as s:
        first = repo.topup(s, "alice", 5_000_000, "pay-1")
    with transaction(sessions) as s:
        again = repo.topup(s, "alice", 5_000_000, "pay-1")
    assert first.created and not again.created
    with transaction(sessions) as s:
        assert repo.view_account(s, "alice").balance_micros == 5_000_000
        assert s.scalar(select(func.count()).select_from(LedgerEntry)) == 1


def test_reference_reused_for_other_amount_is_refused(sessions: sessionmaker[Session], plan: str) -> None:
    with transaction(sessions) as s:
        repo.create_account(s, "alice", plan=plan)
        repo.topup(s, "alice", 5_000_000, "pay-1")
    with pytest.raises(Conflict, match="already used"), transaction(sessions) as s:
        repo.topup(s, "alice", 7_000_000, "pay-1")


@pytest.mark.parametrize("amount", [0, -1])
def test_zero_or_negative_topup_is_refused(sessions: sessionmaker[Session], plan: str, amount: int) -> None:
    with transaction(sessions) as s:
        repo.create_account(s, "alice", plan=plan)
    with pytest.raises(InvalidInput, match="greater than zero"), transaction(sessions) as s:
        repo.topup(s, "alice", amount)


def test_unknown_account_and_plan(sessions: sessionmaker[Session], plan: str) -> None:
    with pytest.raises(NotFound, match="unknown account 'bob'"), transaction(sessions) as s:
        repo.topup(s, "bob", 1)
    with pytest.raises(NotFound, match="unknown rate plan 'gold'"), transaction(sessions) as s:
        repo.create_account(s, "bob", plan="gold")


def test_duplicate_account_is_refused_and_nothing_changes(sessions: sessionmaker[Session], plan: str) -> None:
    with transaction(sessions) as s:
        repo.create_account(s, "alice", plan=plan, balance_micros=1)
    with pytest.raises(Conflict), transaction(sessions) as s:
        repo.create_account(s, "alice", plan=plan, balance_micros=5)
    with transaction(sessions) as s:
        assert repo.view_account(s, "alice").balance_micros == 1


def test_postpaid_available_includes_credit_limit(sessions: sessionmaker[Session], plan: str) -> None:
    with transaction(sessions) as s:
        view = repo.create_account(s, "corp", plan=plan, credit_limit_micros=50_000_000)
    assert view.account_type == "postpaid"
    assert view.available_micros == 50_000_000


def test_suspend_and_resume(sessions: sessionmaker[Session], plan: str) -> None:
    with transaction(sessions) as s:
        repo.create_account(s, "alice", plan=plan)
    with transaction(sessions) as s:
        assert repo.set_status(s, "alice", "suspended").status == "suspended"
    with transaction(sessions) as s:
        assert repo.set_status(s, "alice", "active").status == "active"


def test_concurrent_topups_with_one_reference_credit_once(sessions: sessionmaker[Session], plan: str) -> None:
    """Eight connections racing with the same payment reference: one credit, a consistent ledger."""
    with transaction(sessions) as s:
        repo.create_account(s, "alice", plan=plan)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with transaction(sessions) as s:
                repo.topup(s, "alice", 1_000_000, "same-ref")
                repo.topup(s, "alice", 1_000_000, f"own-{i}")
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with transaction(sessions) as s:
        assert repo.view_account(s, "alice").balance_micros == 9_000_000
        assert repo.ledger_sums(s) == {"alice": 9_000_000}
