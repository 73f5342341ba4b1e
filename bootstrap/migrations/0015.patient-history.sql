-- Who changed what and when: one row per patient event, written by the directory
-- projection in the transaction of its other writes (projections/directory.py) and
-- read by GET /patients/{id}/history (read-api/read_api/history.py). `fields` names
-- what the event set or changed; `values` holds their new values (shown to admins
-- only, see docs/auth.md), in one column so that erasing a patient can null it.
-- Rows for events applied before this table existed come with a rebuild of the
-- directory (`carelog projections rebuild directory --allow-differences`, docs/replay.md).
-- Billing's outbox records the actor of each billing event as well.
-- depends: 0011.auth-revocations
CREATE TABLE IF NOT EXISTS patient_history (
    patient_id uuid NOT NULL,
    version bigint NOT NULL,
    position bigint NOT NULL,
    type text NOT NULL,
    occurred_at timestamptz NOT NULL,
    actor_id text,
    actor_role text,
    correlation_id text,
    fields text[] NOT NULL,
    "values" jsonb,
    PRIMARY KEY (patient_id, version)
);

ALTER TABLE billing.outbox ADD COLUMN IF NOT EXISTS actor_id text;
ALTER TABLE billing.outbox ADD COLUMN IF NOT EXISTS actor_role text;
