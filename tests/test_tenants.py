"""The tenant tree (DESIGN §11) through the CLI on SQLite, PostgreSQL and MariaDB: a reseller and
its account in the parent, at most four levels, no cycle, plans per tenant, read commands that
see only a subtree, and the chain of levels above a customer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine

from agent.adapters.sql.cdr_writer import SqlCdrStore
from agent.adapters.sql.engine import session_factory, transaction
from agent.adapters.sql.tenants import ChainLevel, chain_of
from agent.cli.main import cli
from tests.cdr_builders import make_record

DECK = "prefix,destination,rate\n49,Germany,0.10\n"


def run(engine: Engine, *args: str) -> Result:
    url = engine.url.render_as_string(hide_password=False)
    return CliRunner().invoke(cli, ["--database-url", url, *args], catch_exceptions=False)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def refused(result: Result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture
def tree(engine: Engine) -> Engine:
    """default (EUR) > acme (USD, 100.00 prepaid) > sub (USD, 50.00 credit) > leaf (EUR)."""
    ok(run(engine, "plans", "create", "wholesale", "--currency", "EUR"))
    ok(run(engine, "tenants", "create", "acme", "--parent", "default", "--currency", "USD", "--balance", "100"))
    ok(run(engine, "plans", "create", "acme-retail", "--currency", "USD", "--tenant", "acme"))
    ok(run(engine, "tenants", "create", "sub", "--parent", "acme", "--credit-limit", "50"))
    ok(run(engine, "plans", "create", "sub-retail", "--currency", "EUR", "--tenant", "sub"))
    ok(run(engine, "tenants", "create", "leaf", "--parent", "sub", "--currency", "EUR", "--plan", "sub-retail"))
    return engine


def test_a_reseller_is_a_tenant_and_an_account_in_its_parent(tree: Engine) -> None:
    acme = json.loads(ok(run(tree, "tenants", "show", "acme", "--json")))
    assert (acme["parent"], acme["level"], acme["currency"], acme["account"], acme["balance"],
            acme["account_currency"], acme["plans"]) == ("default", 2, "USD", "tenant:acme", "100.000000", "USD",
                                                         ["acme-retail"])
    account = json.loads(ok(run(tree, "accounts", "show", "tenant:sub", "--json")))
    assert (account["tenant"], account["plan"], account["type"], account["credit_limit"], account["currency"]) == (
        "acme", "acme-retail", "postpaid", "50.000000", "USD")
    listed = json.loads(ok(run(tree, "tenants", "list", "--json")))
    assert [(t["name"], t["level"], t["parent"]) for t in listed] == [
        ("default", 1, None), ("acme", 2, "default"), ("sub", 3, "acme"), ("leaf", 4, "sub")]
    shown = ok(run(tree, "tenants", "show", "default", "--tree"))
    assert shown.splitlines() == [
        "default (level 1, EUR, 1 accounts): operator (no parent to pay)",
        "  acme (level 2, USD, 1 accounts): account tenant:acme: balance 100.000000 USD",
        "    sub (level 3, USD, 1 accounts): account tenant:sub: balance 0.000000 USD, credit limit 50.000000",
        "      leaf (level 4, EUR, 0 accounts): account tenant:leaf: balance 0.000000 EUR",
    ]
    subtree = json.loads(ok(run(tree, "tenants", "show", "sub", "--tree", "--json")))
    assert [c["name"] for c in subtree["children"]] == ["leaf"] and subtree["children"][0]["currency"] == "EUR"


def test_bad_trees_are_refused_with_the_reason(tree: Engine) -> None:
    refused(run(tree, "tenants", "create", "five", "--parent", "leaf", "--plan", "sub-retail"),
            "would make level 5", "at most 4 levels", "default > acme > sub > leaf")
    refused(run(tree, "tenants", "create", "orphan", "--parent", "nobody"), "unknown parent tenant 'nobody'")
    refused(run(tree, "tenants", "create", "acme", "--parent", "default"), "tenant 'acme' already exists")
    refused(run(tree, "tenants", "create", "self", "--parent", "self"), "cannot be its own parent")
    refused(run(tree, "tenants", "move", "acme", "--parent", "leaf"), "would make a cycle",
            "'leaf' is 'acme' itself or below it")
    refused(run(tree, "tenants", "move", "acme", "--parent", "acme"), "would make a cycle")
    refused(run(tree, "tenants", "create", "bad name", "--parent", "default"), "tenant name 'bad name'")
    refused(run(tree, "tenants", "create", "eu", "--parent", "default", "--currency", "EURO"),
            "'EURO' is not an active ISO 4217")
    refused(run(tree, "tenants", "create", "two", "--parent", "acme", "--plan", "wholesale"),
            "plan 'wholesale' belongs to tenant 'default' (the operator's)", "not to tenant 'acme'")
    ok(run(tree, "plans", "create", "acme-gold", "--currency", "USD", "--tenant", "acme"))
    refused(run(tree, "tenants", "create", "three", "--parent", "acme"), "give --plan", "acme-gold, acme-retail")
    # A subtree of two levels (sub > leaf) cannot move under level 3: it would reach level 5.
    ok(run(tree, "tenants", "create", "other", "--parent", "acme", "--plan", "acme-retail"))
    refused(run(tree, "tenants", "move", "sub", "--parent", "other"), "would make level 5")
    ok(run(tree, "tenants", "move", "leaf", "--parent", "acme", "--plan", "acme-gold"))
    assert json.loads(ok(run(tree, "accounts", "show", "tenant:leaf", "--json")))["tenant"] == "acme"


def test_plans_and_accounts_belong_to_a_tenant(tree: Engine, tmp_path: Path) -> None:
    deck = tmp_path / "deck.csv"
    deck.write_text(DECK)
    ok(run(tree, "rates", "import", str(deck), "--plan", "sub-retail", "--tenant", "sub"))
    refused(run(tree, "rates", "import", str(deck), "--plan", "sub-retail", "--tenant", "acme"),
            "rate plan 'sub-retail' belongs to tenant 'sub', not to 'acme'")
    ok(run(tree, "rates", "import", str(deck), "--plan", "leaf-retail", "--tenant", "leaf", "--create-plan"))
    plans = {p["name"]: p["tenant"] for p in json.loads(ok(run(tree, "plans", "list", "--json")))}
    assert plans["leaf-retail"] == "leaf" and plans["wholesale"] == "default"
    refused(run(tree, "accounts", "create", "c1", "--tenant", "sub", "--plan", "acme-retail"),
            "plan 'acme-retail' belongs to tenant 'acme'", "not to tenant 'sub'")
    refused(run(tree, "accounts", "create", "c1", "--tenant", "ghost", "--plan", "wholesale"),
            "unknown tenant 'ghost'")
    ok(run(tree, "accounts", "create", "c1", "--tenant", "sub", "--plan", "sub-retail", "--balance", "3"))
    ok(run(tree, "accounts", "create", "c2", "--tenant", "leaf", "--plan", "leaf-retail"))
    ok(run(tree, "accounts", "create", "direct", "--plan", "wholesale"))
    with transaction(session_factory(tree)) as session:
        assert chain_of(session, "c2") == [
            ChainLevel("leaf", "sub", "tenant:leaf", "sub-retail", "EUR"),
            ChainLevel("sub", "acme", "tenant:sub", "acme-retail", "USD"),
            ChainLevel("acme", "default", "tenant:acme", "wholesale", "USD")]
        assert chain_of(session, "direct") == []


def test_read_commands_see_only_the_tenants_subtree(tree: Engine) -> None:
    ok(run(tree, "accounts", "create", "c1", "--tenant", "sub", "--plan", "sub-retail"))
    ok(run(tree, "accounts", "create", "direct", "--plan", "wholesale"))
    SqlCdrStore(tree).write([make_record(0, account_id="c1"), make_record(1, account_id="direct"),
                             make_record(2, account_id="tenant:sub")])

    def accounts(tenant: str) -> list[str]:
        return [a["id"] for a in json.loads(ok(run(tree, "accounts", "list", "--tenant", tenant, "--json")))]

    assert accounts("sub") == ["c1", "tenant:leaf"]
    assert accounts("acme") == ["c1", "tenant:leaf", "tenant:sub"]
    assert accounts("default") == ["c1", "direct", "tenant:acme", "tenant:leaf", "tenant:sub"]
    assert [r["account_id"] for r in json.loads(ok(run(tree, "cdrs", "list", "--tenant", "sub", "--json")))] == ["c1"]
    assert [r["account_id"] for r in json.loads(ok(run(tree, "cdrs", "list", "--tenant", "acme", "--json")))] == [
        "c1", "tenant:sub"]
    exported = ok(run(tree, "cdrs", "export", "--tenant", "acme"))  # PostgreSQL: the server's own CSV
    assert exported.count("\n") == 3 and ",c1," in exported and ",direct," not in exported
    assert [p["name"] for p in json.loads(ok(run(tree, "plans", "list", "--tenant", "sub", "--json")))] == [
        "sub-retail"]
    assert [t["name"] for t in json.loads(ok(run(tree, "tenants", "list", "--tenant", "sub", "--json")))] == [
        "sub", "leaf"]
    refused(run(tree, "accounts", "list", "--tenant", "nobody"), "unknown tenant 'nobody'")
