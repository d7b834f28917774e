-- billing-agent schema for sqlite: generated from agent/adapters/sql/models.py.
-- Prefer `billing-agent db upgrade` (migrations); this file is for DBAs who review or
-- apply DDL by hand. Do not edit: regenerate with `billing-agent db ddl sqlite`.

CREATE TABLE agent_nodes (
	node VARCHAR(64) NOT NULL,
	host VARCHAR(255) NOT NULL,
	pid INTEGER NOT NULL,
	version VARCHAR(32) NOT NULL,
	pbx VARCHAR(64) NOT NULL,
	started_at DATETIME NOT NULL,
	heartbeat_at DATETIME NOT NULL,
	stopped_at DATETIME,
	live_calls INTEGER NOT NULL,
	CONSTRAINT pk_agent_nodes PRIMARY KEY (node)
);

CREATE TABLE alerts (
	id INTEGER NOT NULL,
	created_at DATETIME NOT NULL,
	node VARCHAR(64) NOT NULL,
	account_id VARCHAR(64) NOT NULL,
	rule VARCHAR(64) NOT NULL,
	kind VARCHAR(32) NOT NULL,
	figure BIGINT NOT NULL,
	threshold BIGINT NOT NULL,
	window_s INTEGER NOT NULL,
	action VARCHAR(16) NOT NULL,
	call_id VARCHAR(64) NOT NULL,
	destination VARCHAR(64) NOT NULL,
	detail VARCHAR(255) NOT NULL,
	acked_at DATETIME,
	CONSTRAINT pk_alerts PRIMARY KEY (id)
);

CREATE INDEX ix_alerts_account_id_created_at ON alerts (account_id, created_at);

CREATE INDEX ix_alerts_created_at ON alerts (created_at);

CREATE TABLE bundle_usage (
	id INTEGER NOT NULL,
	account_id VARCHAR(64) NOT NULL,
	grant_id BIGINT NOT NULL,
	period_start_ms BIGINT NOT NULL,
	kind VARCHAR(16) NOT NULL,
	seconds BIGINT NOT NULL,
	reference VARCHAR(191) NOT NULL,
	call_id VARCHAR(64),
	created_at DATETIME NOT NULL,
	CONSTRAINT pk_bundle_usage PRIMARY KEY (id),
	CONSTRAINT ck_bundle_usage_kind_known CHECK (kind IN ('grant', 'rollover', 'use', 'adjust')),
	CONSTRAINT uq_bundle_usage_reference UNIQUE (reference)
);

CREATE INDEX ix_bundle_usage_call_id ON bundle_usage (call_id);

CREATE INDEX ix_bundle_usage_grant_id_period_start_ms ON bundle_usage (grant_id, period_start_ms);

CREATE TABLE bundles (
	id INTEGER NOT NULL,
	name VARCHAR(64) NOT NULL,
	seconds BIGINT NOT NULL,
	period VARCHAR(8) NOT NULL,
	anchor INTEGER NOT NULL,
	rollover BOOLEAN NOT NULL,
	created_at DATETIME NOT NULL,
	deleted_at DATETIME,
	CONSTRAINT pk_bundles PRIMARY KEY (id),
	CONSTRAINT ck_bundles_period_known CHECK (period IN ('month', 'week', 'once')),
	CONSTRAINT ck_bundles_seconds_positive CHECK (seconds > 0),
	CONSTRAINT uq_bundles_name UNIQUE (name)
);

CREATE TABLE call_commands (
	id INTEGER NOT NULL,
	call_id VARCHAR(64) NOT NULL,
	node VARCHAR(64) NOT NULL,
	command VARCHAR(16) NOT NULL,
	reason VARCHAR(255) NOT NULL,
	requested_at DATETIME NOT NULL,
	done_at DATETIME,
	result VARCHAR(255) NOT NULL,
	CONSTRAINT pk_call_commands PRIMARY KEY (id),
	CONSTRAINT ck_call_commands_command_known CHECK (command IN ('hangup'))
);

CREATE INDEX ix_call_commands_node_done_at ON call_commands (node, done_at);

CREATE TABLE call_legs (
	id INTEGER NOT NULL,
	call_id VARCHAR(64) NOT NULL,
	pbx_unique_id VARCHAR(64) NOT NULL,
	channel VARCHAR(255) NOT NULL,
	direction VARCHAR(8) NOT NULL,
	sip_call_id VARCHAR(255) NOT NULL,
	peer VARCHAR(128) NOT NULL,
	caller VARCHAR(64) NOT NULL,
	callee VARCHAR(64) NOT NULL,
	created_at DATETIME NOT NULL,
	answered_at DATETIME,
	ended_at DATETIME,
	hangup_cause VARCHAR(64) NOT NULL,
	billsec INTEGER NOT NULL,
	billed BOOLEAN NOT NULL,
	CONSTRAINT pk_call_legs PRIMARY KEY (id),
	CONSTRAINT uq_call_legs_call_id_pbx_unique_id UNIQUE (call_id, pbx_unique_id)
);

CREATE TABLE calls (
	id VARCHAR(64) NOT NULL,
	node VARCHAR(64) NOT NULL,
	account_id VARCHAR(64) NOT NULL,
	caller VARCHAR(64) NOT NULL,
	destination VARCHAR(64) NOT NULL,
	started_at DATETIME NOT NULL,
	answered_at DATETIME,
	ended_at DATETIME,
	duration_ms BIGINT NOT NULL,
	disposition VARCHAR(16) NOT NULL,
	hangup_cause VARCHAR(64) NOT NULL,
	pbx VARCHAR(16) NOT NULL,
	settled_at DATETIME,
	CONSTRAINT pk_calls PRIMARY KEY (id)
);

CREATE INDEX ix_calls_account_id_started_at ON calls (account_id, started_at);

CREATE INDEX ix_calls_started_at ON calls (started_at);

CREATE TABLE carriers (
	id INTEGER NOT NULL,
	name VARCHAR(64) NOT NULL,
	trunk VARCHAR(255) NOT NULL,
	currency VARCHAR(3) NOT NULL,
	max_channels INTEGER,
	priority INTEGER NOT NULL,
	weight INTEGER NOT NULL,
	enabled BOOLEAN NOT NULL,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	CONSTRAINT pk_carriers PRIMARY KEY (id),
	CONSTRAINT ck_carriers_max_channels_positive CHECK (max_channels IS NULL OR max_channels > 0),
	CONSTRAINT ck_carriers_priority_not_negative CHECK (priority >= 0),
	CONSTRAINT ck_carriers_weight_positive CHECK (weight >= 1),
	CONSTRAINT uq_carriers_name UNIQUE (name)
);

CREATE TABLE cdr_quarantine (
	id INTEGER NOT NULL,
	digest VARCHAR(64) NOT NULL,
	call_id VARCHAR(191) NOT NULL,
	node VARCHAR(64) NOT NULL,
	reason VARCHAR(1000) NOT NULL,
	payload TEXT NOT NULL,
	created_at DATETIME NOT NULL,
	CONSTRAINT pk_cdr_quarantine PRIMARY KEY (id),
	CONSTRAINT uq_cdr_quarantine_digest UNIQUE (digest)
);

CREATE INDEX ix_cdr_quarantine_created_at ON cdr_quarantine (created_at);

CREATE TABLE fx_rates (
	id INTEGER NOT NULL,
	base VARCHAR(3) NOT NULL,
	quote VARCHAR(3) NOT NULL,
	rate_e10 BIGINT NOT NULL,
	effective_from DATETIME NOT NULL,
	created_at DATETIME NOT NULL,
	CONSTRAINT pk_fx_rates PRIMARY KEY (id),
	CONSTRAINT uq_fx_rates_base_quote_effective_from UNIQUE (base, quote, effective_from),
	CONSTRAINT ck_fx_rates_rate_positive CHECK (rate_e10 > 0),
	CONSTRAINT ck_fx_rates_pair_of_two CHECK (base <> quote)
);

CREATE TABLE live_calls (
	call_id VARCHAR(64) NOT NULL,
	node VARCHAR(64) NOT NULL,
	pbx VARCHAR(16) NOT NULL,
	account_id VARCHAR(64) NOT NULL,
	destination VARCHAR(64) NOT NULL,
	caller VARCHAR(128) NOT NULL,
	a_leg_id VARCHAR(191) NOT NULL,
	authorized_at DATETIME NOT NULL,
	answered_at DATETIME,
	cut_at DATETIME,
	CONSTRAINT pk_live_calls PRIMARY KEY (call_id)
);

CREATE INDEX ix_live_calls_node ON live_calls (node);

CREATE TABLE rating_decisions (
	id INTEGER NOT NULL,
	call_id VARCHAR(64) NOT NULL,
	seq INTEGER NOT NULL,
	plan_name VARCHAR(64) NOT NULL,
	rate_id BIGINT,
	prefix VARCHAR(32) NOT NULL,
	rate_micros BIGINT NOT NULL,
	billed_seconds INTEGER NOT NULL,
	bundle_seconds INTEGER NOT NULL,
	cost_micros BIGINT NOT NULL,
	decided_at DATETIME NOT NULL,
	reason VARCHAR(255) NOT NULL,
	plan_currency VARCHAR(3) NOT NULL,
	currency VARCHAR(3) NOT NULL,
	fx_rate_e10 BIGINT,
	fx_inverse BOOLEAN NOT NULL,
	plan_cost_micros BIGINT,
	level INTEGER NOT NULL,
	tenant VARCHAR(64) NOT NULL,
	account_id VARCHAR(64) NOT NULL,
	of_call_id VARCHAR(64),
	carrier VARCHAR(64) NOT NULL,
	buy_rate_id BIGINT,
	buy_prefix VARCHAR(32) NOT NULL,
	buy_rate_micros BIGINT NOT NULL,
	buy_billed_seconds INTEGER NOT NULL,
	buy_cost_micros BIGINT,
	margin_micros BIGINT,
	CONSTRAINT pk_rating_decisions PRIMARY KEY (id),
	CONSTRAINT uq_rating_decisions_call_id_seq UNIQUE (call_id, seq)
);

CREATE INDEX ix_rating_decisions_carrier ON rating_decisions (carrier);

CREATE INDEX ix_rating_decisions_of_call_id ON rating_decisions (of_call_id);

CREATE INDEX ix_rating_decisions_tenant ON rating_decisions (tenant);

CREATE TABLE tenants (
	id INTEGER NOT NULL,
	name VARCHAR(64) NOT NULL,
	created_at DATETIME NOT NULL,
	parent_id INTEGER,
	currency VARCHAR(3) NOT NULL,
	account_id VARCHAR(64),
	CONSTRAINT pk_tenants PRIMARY KEY (id),
	CONSTRAINT uq_tenants_name UNIQUE (name),
	CONSTRAINT fk_tenants_parent_id_tenants FOREIGN KEY(parent_id) REFERENCES tenants (id),
	CONSTRAINT uq_tenants_account_id UNIQUE (account_id)
);

CREATE INDEX ix_tenants_parent_id ON tenants (parent_id);

CREATE TABLE bundle_prefixes (
	bundle_id INTEGER NOT NULL,
	prefix VARCHAR(32) NOT NULL,
	CONSTRAINT pk_bundle_prefixes PRIMARY KEY (bundle_id, prefix),
	CONSTRAINT fk_bundle_prefixes_bundle_id_bundles FOREIGN KEY(bundle_id) REFERENCES bundles (id) ON DELETE CASCADE
);

CREATE TABLE rate_plans (
	id INTEGER NOT NULL,
	name VARCHAR(64) NOT NULL,
	currency VARCHAR(3) NOT NULL,
	timezone VARCHAR(64) NOT NULL,
	international_prefix VARCHAR(8) NOT NULL,
	version INTEGER NOT NULL,
	low_balance_micros BIGINT,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	tenant_id INTEGER,
	carrier_id INTEGER,
	route_policy VARCHAR(8) NOT NULL,
	allow_loss BOOLEAN NOT NULL,
	margin_floor_micros BIGINT,
	margin_floor_bp INTEGER,
	CONSTRAINT pk_rate_plans PRIMARY KEY (id),
	CONSTRAINT uq_rate_plans_name UNIQUE (name),
	CONSTRAINT fk_rate_plans_tenant_id_tenants FOREIGN KEY(tenant_id) REFERENCES tenants (id),
	CONSTRAINT uq_rate_plans_carrier_id UNIQUE (carrier_id),
	CONSTRAINT fk_rate_plans_carrier_id_carriers FOREIGN KEY(carrier_id) REFERENCES carriers (id)
);

CREATE INDEX ix_rate_plans_tenant_id ON rate_plans (tenant_id);

CREATE TABLE accounts (
	id VARCHAR(64) NOT NULL,
	tenant_id INTEGER NOT NULL,
	rate_plan_id INTEGER NOT NULL,
	currency VARCHAR(3) NOT NULL,
	account_type VARCHAR(8) NOT NULL,
	status VARCHAR(16) NOT NULL,
	credit_limit_micros BIGINT NOT NULL,
	balance_micros BIGINT NOT NULL,
	reserved_micros BIGINT NOT NULL,
	max_concurrent_calls INTEGER,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	suspended_by_rule VARCHAR(64),
	suspended_at DATETIME,
	max_call_cost_micros BIGINT,
	daily_spend_micros BIGINT,
	monthly_spend_micros BIGINT,
	low_balance_micros BIGINT,
	CONSTRAINT pk_accounts PRIMARY KEY (id),
	CONSTRAINT ck_accounts_credit_limit_not_negative CHECK (credit_limit_micros >= 0),
	CONSTRAINT ck_accounts_reserved_not_negative CHECK (reserved_micros >= 0),
	CONSTRAINT ck_accounts_status_known CHECK (status IN ('active', 'suspended', 'closed')),
	CONSTRAINT ck_accounts_type_known CHECK (account_type IN ('prepaid', 'postpaid')),
	CONSTRAINT fk_accounts_tenant_id_tenants FOREIGN KEY(tenant_id) REFERENCES tenants (id),
	CONSTRAINT fk_accounts_rate_plan_id_rate_plans FOREIGN KEY(rate_plan_id) REFERENCES rate_plans (id)
);

CREATE INDEX ix_accounts_suspended_by_rule ON accounts (suspended_by_rule);

CREATE TABLE rates (
	id INTEGER NOT NULL,
	plan_id INTEGER NOT NULL,
	prefix VARCHAR(32) NOT NULL,
	destination VARCHAR(128) NOT NULL,
	rate_micros BIGINT NOT NULL,
	connect_fee_micros BIGINT NOT NULL,
	initial_increment INTEGER NOT NULL,
	increment INTEGER NOT NULL,
	minimum_seconds INTEGER NOT NULL,
	grace_seconds INTEGER NOT NULL,
	effective_from DATETIME NOT NULL,
	effective_to DATETIME,
	weekdays VARCHAR(7) NOT NULL,
	time_from_minute INTEGER NOT NULL,
	time_to_minute INTEGER NOT NULL,
	blocked BOOLEAN NOT NULL,
	CONSTRAINT pk_rates PRIMARY KEY (id),
	CONSTRAINT uq_rates_plan_prefix_window UNIQUE (plan_id, prefix, effective_from, weekdays, time_from_minute),
	CONSTRAINT ck_rates_rate_not_negative CHECK (rate_micros >= 0),
	CONSTRAINT ck_rates_connect_fee_not_negative CHECK (connect_fee_micros >= 0),
	CONSTRAINT ck_rates_increments_positive CHECK (initial_increment > 0 AND increment > 0),
	CONSTRAINT ck_rates_min_grace_not_negative CHECK (minimum_seconds >= 0 AND grace_seconds >= 0),
	CONSTRAINT fk_rates_plan_id_rate_plans FOREIGN KEY(plan_id) REFERENCES rate_plans (id) ON DELETE CASCADE
);

CREATE INDEX ix_rates_plan_id_prefix ON rates (plan_id, prefix);

CREATE TABLE bundle_grants (
	id INTEGER NOT NULL,
	account_id VARCHAR(64) NOT NULL,
	bundle_id INTEGER NOT NULL,
	valid_from DATETIME NOT NULL,
	valid_until DATETIME,
	reference VARCHAR(191) NOT NULL,
	created_at DATETIME NOT NULL,
	CONSTRAINT pk_bundle_grants PRIMARY KEY (id),
	CONSTRAINT fk_bundle_grants_account_id_accounts FOREIGN KEY(account_id) REFERENCES accounts (id),
	CONSTRAINT fk_bundle_grants_bundle_id_bundles FOREIGN KEY(bundle_id) REFERENCES bundles (id),
	CONSTRAINT uq_bundle_grants_reference UNIQUE (reference)
);

CREATE INDEX ix_bundle_grants_account_id ON bundle_grants (account_id);

CREATE TABLE ledger_entries (
	id INTEGER NOT NULL,
	account_id VARCHAR(64) NOT NULL,
	kind VARCHAR(16) NOT NULL,
	amount_micros BIGINT NOT NULL,
	balance_after_micros BIGINT NOT NULL,
	reference VARCHAR(191) NOT NULL,
	call_id VARCHAR(64),
	description VARCHAR(255) NOT NULL,
	created_at DATETIME NOT NULL,
	CONSTRAINT pk_ledger_entries PRIMARY KEY (id),
	CONSTRAINT ck_ledger_entries_kind_known CHECK (kind IN ('opening', 'topup', 'charge', 'refund', 'adjustment')),
	CONSTRAINT fk_ledger_entries_account_id_accounts FOREIGN KEY(account_id) REFERENCES accounts (id),
	CONSTRAINT uq_ledger_entries_reference UNIQUE (reference)
);

CREATE INDEX ix_ledger_entries_account_id_id ON ledger_entries (account_id, id);

CREATE INDEX ix_ledger_entries_call_id ON ledger_entries (call_id);

CREATE TABLE reservations (
	call_id VARCHAR(64) NOT NULL,
	account_id VARCHAR(64) NOT NULL,
	node VARCHAR(64) NOT NULL,
	state VARCHAR(16) NOT NULL,
	seq INTEGER NOT NULL,
	granted_micros BIGINT NOT NULL,
	last_debit_micros BIGINT NOT NULL,
	auth_granted_micros BIGINT NOT NULL,
	auth_available_micros BIGINT NOT NULL,
	reserved_micros BIGINT NOT NULL,
	debited_micros BIGINT NOT NULL,
	overrun_micros BIGINT NOT NULL,
	closed_charge_micros BIGINT,
	cost_micros BIGINT,
	created_at DATETIME NOT NULL,
	expires_at DATETIME NOT NULL,
	closed_at DATETIME,
	bundle_held_s BIGINT NOT NULL,
	bundle_used_s BIGINT NOT NULL,
	bundle_last_granted_s BIGINT NOT NULL,
	bundle_slots TEXT NOT NULL,
	spend_day_ms BIGINT NOT NULL,
	spend_month_ms BIGINT NOT NULL,
	CONSTRAINT pk_reservations PRIMARY KEY (call_id),
	CONSTRAINT ck_reservations_state_known CHECK (state IN ('open', 'settled', 'released', 'expired')),
	CONSTRAINT ck_reservations_amounts_not_negative CHECK (reserved_micros >= 0 AND debited_micros >= 0 AND overrun_micros >= 0),
	CONSTRAINT fk_reservations_account_id_accounts FOREIGN KEY(account_id) REFERENCES accounts (id)
);

CREATE INDEX ix_reservations_account_id_state ON reservations (account_id, state);

CREATE INDEX ix_reservations_state_expires_at ON reservations (state, expires_at);

CREATE TABLE spend_periods (
	account_id VARCHAR(64) NOT NULL,
	kind VARCHAR(8) NOT NULL,
	start_ms BIGINT NOT NULL,
	spent_micros BIGINT NOT NULL,
	held_micros BIGINT NOT NULL,
	CONSTRAINT pk_spend_periods PRIMARY KEY (account_id, kind, start_ms),
	CONSTRAINT ck_spend_periods_kind_known CHECK (kind IN ('day', 'month')),
	CONSTRAINT fk_spend_periods_account_id_accounts FOREIGN KEY(account_id) REFERENCES accounts (id)
);

CREATE TABLE bundle_periods (
	grant_id INTEGER NOT NULL,
	period_start_ms BIGINT NOT NULL,
	account_id VARCHAR(64) NOT NULL,
	period_end_ms BIGINT NOT NULL,
	granted_s BIGINT NOT NULL,
	used_s BIGINT NOT NULL,
	reserved_s BIGINT NOT NULL,
	CONSTRAINT pk_bundle_periods PRIMARY KEY (grant_id, period_start_ms),
	CONSTRAINT ck_bundle_periods_seconds_not_negative CHECK (granted_s >= 0 AND reserved_s >= 0),
	CONSTRAINT fk_bundle_periods_grant_id_bundle_grants FOREIGN KEY(grant_id) REFERENCES bundle_grants (id)
);

CREATE INDEX ix_bundle_periods_account_id ON bundle_periods (account_id);
