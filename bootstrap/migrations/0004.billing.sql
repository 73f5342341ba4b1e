-- Billing's accounts, invoices, payments and its outbox (billing-grpc/billing_grpc/store.py).
-- depends: 0001.event-store
CREATE SCHEMA IF NOT EXISTS billing;

CREATE TABLE IF NOT EXISTS billing.accounts (
    id uuid PRIMARY KEY,
    patient_id uuid NOT NULL UNIQUE,
    currency char(3) NOT NULL,
    status text NOT NULL CHECK (status IN ('open', 'closed')),
    invoiced_minor bigint NOT NULL DEFAULT 0 CHECK (invoiced_minor >= 0),
    paid_minor bigint NOT NULL DEFAULT 0 CHECK (paid_minor >= 0 AND paid_minor <= invoiced_minor),
    version bigint NOT NULL,
    name text NOT NULL,
    email text NOT NULL,
    patient_version bigint NOT NULL DEFAULT 0,
    opened_by text NOT NULL,
    registered_at timestamptz,
    opened_at timestamptz NOT NULL,
    closed_at timestamptz
);

CREATE TABLE IF NOT EXISTS billing.invoices (
    id uuid PRIMARY KEY,
    seq bigserial UNIQUE,
    account_id uuid NOT NULL REFERENCES billing.accounts (id),
    currency char(3) NOT NULL,
    lines jsonb NOT NULL,
    total_minor bigint NOT NULL CHECK (total_minor > 0),
    request_id text,
    request_digest text,
    issued_at timestamptz NOT NULL,
    UNIQUE (account_id, request_id)
);
CREATE INDEX IF NOT EXISTS invoices_by_account ON billing.invoices (account_id, seq);

CREATE TABLE IF NOT EXISTS billing.payments (
    id uuid PRIMARY KEY,
    seq bigserial UNIQUE,
    account_id uuid NOT NULL REFERENCES billing.accounts (id),
    currency char(3) NOT NULL,
    amount_minor bigint NOT NULL CHECK (amount_minor > 0),
    request_id text,
    request_digest text,
    received_at timestamptz NOT NULL,
    UNIQUE (account_id, request_id)
);

CREATE TABLE IF NOT EXISTS billing.outbox (
    id bigserial PRIMARY KEY,
    aggregate_id uuid NOT NULL,
    aggregate_version bigint NOT NULL,
    type text NOT NULL,
    schema_version int NOT NULL,
    payload bytea NOT NULL,
    occurred_at timestamptz NOT NULL,
    correlation_id text,
    published_at timestamptz,
    UNIQUE (aggregate_id, aggregate_version)
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON billing.outbox (id) WHERE published_at IS NULL;
