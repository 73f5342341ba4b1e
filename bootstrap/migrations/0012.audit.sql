-- The disclosure audit (runtime/audit.py): one row per answer that showed a patient's
-- personal data, written before the answer went out. Who (the token's subject and
-- role, or the operator at the CLI), what (the operation and the patients' ids), when,
-- and the request's correlation id; never the data itself.
-- Append-only: the triggers below refuse UPDATE, DELETE and TRUNCATE to everyone, the
-- table's owner included, and no API offers either.
-- depends: 0011.auth-revocations
CREATE SCHEMA IF NOT EXISTS audit;

CREATE TABLE IF NOT EXISTS audit.disclosures (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    role text NOT NULL,
    operation text NOT NULL,
    patient_ids uuid[] NOT NULL,
    correlation_id text NOT NULL
);
-- GET /audit: newest first by id, filtered by patient, by actor, by time.
CREATE INDEX IF NOT EXISTS disclosures_patients ON audit.disclosures USING gin (patient_ids);
CREATE INDEX IF NOT EXISTS disclosures_actor ON audit.disclosures (actor, id);
CREATE INDEX IF NOT EXISTS disclosures_at ON audit.disclosures (at);

CREATE OR REPLACE FUNCTION audit.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $BODY$
BEGIN
    RAISE EXCEPTION 'audit.disclosures is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$BODY$;

CREATE OR REPLACE TRIGGER disclosures_append_only
    BEFORE UPDATE OR DELETE ON audit.disclosures
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE OR REPLACE TRIGGER disclosures_no_truncate
    BEFORE TRUNCATE ON audit.disclosures
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
REVOKE UPDATE, DELETE, TRUNCATE ON audit.disclosures FROM PUBLIC;
