"""Prometheus metrics of one agent process (served by the daemon's HTTP endpoint)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """One registry per agent, so tests and several engines in one process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.authorizations = Counter("billing_authorizations", "Authorization decisions", ["result"], registry=r)
        self.authorize_seconds = Histogram(
            "billing_authorize_seconds", "Authorization latency",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r)
        self.live_calls = Gauge("billing_live_calls", "Calls being supervised", registry=r)
        self.nibble_debits = Counter("billing_nibble_debits", "Nibble debits committed", registry=r)
        self.cutoffs = Counter("billing_cutoffs", "Calls cut because the money ran out", registry=r)
        self.failed_cutoffs = Counter("billing_failed_cutoffs", "Cut-offs the PBX did not confirm", registry=r)
        self.alerts = Counter("billing_alerts", "Operator alerts", ["kind"], registry=r)
        self.fraud_alerts = Counter("billing_fraud_alerts", "Fraud rules that fired (one per account and rule "
                                    "per minute)", ["rule", "action"], registry=r)
        self.fraud_observes = Counter(
            "billing_fraud_observes", "Calls counted by the shared fraud counters at authorize, by how: 'with_store' "
            "in the balance store's round trip, 'alone' on a round trip of their own", ["how"], registry=r)
        self.settled = Counter("billing_settled_calls", "Calls settled", ["disposition"], registry=r)
        self.settle_retries = Counter("billing_settle_retries", "Settle attempts that failed and were retried",
                                      registry=r)
        self.timer_lateness = Histogram(
            "billing_timer_lateness_seconds", "How late call timers fired",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.cdr_queue = Gauge("billing_cdr_queue_depth", "CDRs waiting to reach SQL", registry=r)
        self.ledger_backlog = Gauge("billing_ledger_backlog", "Closed calls settled in Redis whose ledger entries "
                                    "this process has not written to SQL yet", registry=r)
        self.store_rebuilt_accounts = Counter(
            "billing_store_rebuilt_accounts", "Accounts rebuilt from the SQL ledger after a Redis master changed "
            "(a replica promoted, a restart)", registry=r)
        self.connection_up = Gauge("billing_connection_up", "1 when a connection is up", ["target"], registry=r)
        self.unknown_events = Counter("billing_unknown_events", "PBX events for legs the agent does not know",
                                      registry=r)
