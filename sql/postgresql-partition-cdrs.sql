-- billing-agent, PostgreSQL only, opt-in: partition calls and call_legs by month.
--
-- Why opt-in and not the default schema: SQLite and MariaDB share the models and migrations,
-- and a partitioned table changes the keys. PostgreSQL requires the partition key in every
-- primary key and unique constraint, so
--   * calls:      PRIMARY KEY (id)                      -> (id, started_at)
--   * call_legs:  UNIQUE (call_id, pbx_unique_id)       -> (call_id, pbx_unique_id, created_at)
--                 PRIMARY KEY (id)                      -> (id, created_at)
--   * the foreign keys of call_legs and rating_decisions to calls(id), which a database made
--     before migration 0005 still has, are dropped (a key of a partitioned table that leaves
--     out the partition key cannot be referenced).
-- Idempotent CDR writes still hold: a replayed CDR carries the same started_at / created_at as
-- the first copy (they come from the spooled record), so the new keys refuse it exactly as the old
-- ones did, and the writer (COPY, or INSERT ... ON CONFLICT DO NOTHING) needs no change. A call
-- and its legs and decision are still written in one transaction by the CDR writer.
-- rating_decisions stays a plain table: it is small (one row per call and re-rating) and its
-- (call_id, seq) key is what makes re-rating safe.
--
-- Apply (takes an exclusive lock on the CDR tables for the copy; stop the agents' CDR writers
-- or let them spool meanwhile, which they do by themselves while the tables are locked):
--     billing-agent db upgrade
--     psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/postgresql-partition-cdrs.sql
--
-- Keep months ahead (monthly cron; a row of a month without a partition lands in the DEFAULT
-- partition, which should stay empty: a month cannot be created while the default holds rows of it):
--     SELECT cdr_ensure_months(now()::timestamp, 3);
--
-- Retire a month (after archiving it, e.g. pg_dump -t calls_2025_01 -t call_legs_2025_01):
--     BEGIN;
--     DELETE FROM rating_decisions WHERE call_id IN (SELECT id FROM calls_2025_01);
--     ALTER TABLE calls DETACH PARTITION calls_2025_01;
--     ALTER TABLE call_legs DETACH PARTITION call_legs_2025_01;
--     DROP TABLE calls_2025_01, call_legs_2025_01;
--     COMMIT;
-- The ledger (ledger_entries) is never retired this way: balances are the sum of it.

BEGIN;

LOCK TABLE calls, call_legs, rating_decisions IN ACCESS EXCLUSIVE MODE;

ALTER TABLE call_legs DROP CONSTRAINT IF EXISTS fk_call_legs_call_id_calls;
ALTER TABLE rating_decisions DROP CONSTRAINT IF EXISTS fk_rating_decisions_call_id_calls;

ALTER TABLE calls RENAME TO calls_unpartitioned;
ALTER TABLE calls_unpartitioned RENAME CONSTRAINT pk_calls TO pk_calls_unpartitioned;
ALTER INDEX ix_calls_account_id_started_at RENAME TO ix_calls_unpartitioned_account_id_started_at;
ALTER INDEX ix_calls_started_at RENAME TO ix_calls_unpartitioned_started_at;
ALTER TABLE call_legs RENAME TO call_legs_unpartitioned;
ALTER TABLE call_legs_unpartitioned RENAME CONSTRAINT pk_call_legs TO pk_call_legs_unpartitioned;
ALTER TABLE call_legs_unpartitioned RENAME CONSTRAINT uq_call_legs_call_id_pbx_unique_id
    TO uq_call_legs_unpartitioned_call_id_pbx_unique_id;

CREATE TABLE calls (LIKE calls_unpartitioned INCLUDING DEFAULTS INCLUDING COMMENTS)
    PARTITION BY RANGE (started_at);
ALTER TABLE calls ADD CONSTRAINT pk_calls PRIMARY KEY (id, started_at);
CREATE INDEX ix_calls_account_id_started_at ON calls (account_id, started_at);
CREATE INDEX ix_calls_started_at ON calls (started_at);
CREATE TABLE calls_default PARTITION OF calls DEFAULT;

CREATE TABLE call_legs (LIKE call_legs_unpartitioned INCLUDING DEFAULTS INCLUDING COMMENTS)
    PARTITION BY RANGE (created_at);
ALTER TABLE call_legs ADD CONSTRAINT pk_call_legs PRIMARY KEY (id, created_at);
ALTER TABLE call_legs ADD CONSTRAINT uq_call_legs_call_id_pbx_unique_id
    UNIQUE (call_id, pbx_unique_id, created_at);
CREATE TABLE call_legs_default PARTITION OF call_legs DEFAULT;
-- The id sequence now belongs to the new table (it would go with the old one otherwise).
ALTER SEQUENCE call_legs_id_seq OWNED BY call_legs.id;

CREATE OR REPLACE FUNCTION cdr_ensure_months(first_month timestamp, months_ahead integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamp := date_trunc('month', first_month);
    last_month timestamp := date_trunc('month', first_month) + make_interval(months => months_ahead);
    suffix text;
BEGIN
    WHILE month_start <= last_month LOOP
        suffix := to_char(month_start, 'YYYY_MM');
        EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF calls FOR VALUES FROM (%L) TO (%L)',
                       'calls_' || suffix, month_start, month_start + interval '1 month');
        EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF call_legs FOR VALUES FROM (%L) TO (%L)',
                       'call_legs_' || suffix, month_start, month_start + interval '1 month');
        month_start := month_start + interval '1 month';
    END LOOP;
END $$;

-- A partition for every month that holds calls or legs, and three months ahead.
SELECT cdr_ensure_months(month, 0)
FROM (SELECT DISTINCT date_trunc('month', started_at) AS month FROM calls_unpartitioned
      UNION SELECT DISTINCT date_trunc('month', created_at) FROM call_legs_unpartitioned) AS months;
SELECT cdr_ensure_months(now()::timestamp, 3);

INSERT INTO calls SELECT * FROM calls_unpartitioned;
INSERT INTO call_legs SELECT * FROM call_legs_unpartitioned;
DROP TABLE call_legs_unpartitioned;
DROP TABLE calls_unpartitioned;

COMMIT;

ANALYZE calls;
ANALYZE call_legs;
