-- The disclosure audit names the patients a record shows by reference: each distinct
-- list of patient ids (a page of 50, one patient, ...) is stored once in
-- `audit.patient_sets`, keyed by its SHA-256 digest (of the ids' 16 bytes each, in
-- order), and a record carries the digest. A list page read a thousand times costs
-- a thousand small rows and one list, not a thousand lists of 50 ids each indexed
-- anew: the audit's cost per answer no longer grows with the page.
-- Records written before this keep their own `patient_ids`, as they were written (the
-- table stays append-only: nothing here rewrites a record); `audit.records` shows
-- both kinds alike.
-- depends: 0012.audit 0016.claim-key
CREATE TABLE IF NOT EXISTS audit.patient_sets (
    digest bytea PRIMARY KEY CHECK (octet_length(digest) = 32),
    patient_ids uuid[] NOT NULL
);
-- GET /audit?patientId: the lists that hold the patient, then the records naming them.
CREATE INDEX IF NOT EXISTS patient_sets_patients ON audit.patient_sets USING gin (patient_ids);

CREATE OR REPLACE FUNCTION audit.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $BODY$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$BODY$;

CREATE OR REPLACE TRIGGER patient_sets_append_only
    BEFORE UPDATE OR DELETE ON audit.patient_sets
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE OR REPLACE TRIGGER patient_sets_no_truncate
    BEFORE TRUNCATE ON audit.patient_sets
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();
REVOKE UPDATE, DELETE, TRUNCATE ON audit.patient_sets FROM PUBLIC;

ALTER TABLE audit.disclosures ALTER COLUMN patient_ids DROP NOT NULL;
ALTER TABLE audit.disclosures ADD COLUMN IF NOT EXISTS patient_set bytea;
ALTER TABLE audit.disclosures DROP CONSTRAINT IF EXISTS disclosures_names_patients_once;
ALTER TABLE audit.disclosures ADD CONSTRAINT disclosures_names_patients_once
    CHECK (num_nonnulls(patient_ids, patient_set) = 1);

-- The records written before keep their index; the new ones are found through their list.
DROP INDEX IF EXISTS audit.disclosures_patients;
CREATE INDEX IF NOT EXISTS disclosures_patients ON audit.disclosures USING gin (patient_ids)
    WHERE patient_ids IS NOT NULL;
CREATE INDEX IF NOT EXISTS disclosures_patient_set ON audit.disclosures (patient_set, id)
    WHERE patient_set IS NOT NULL;
-- Records arrive in time order and never change: a block-range index finds a time span
-- as well as a b-tree, for next to nothing per record written.
DROP INDEX IF EXISTS audit.disclosures_at;
CREATE INDEX IF NOT EXISTS disclosures_at_range ON audit.disclosures USING brin (at);

-- Every record as GET /audit shows it, with its patients' ids whichever way they are kept.
CREATE OR REPLACE VIEW audit.records AS
SELECT d.id, d.at, d.actor, d.role, d.operation,
       coalesce(d.patient_ids, s.patient_ids) AS patient_ids, d.correlation_id
FROM audit.disclosures d
LEFT JOIN audit.patient_sets s ON s.digest = d.patient_set;
