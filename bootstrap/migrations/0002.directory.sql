-- The patient directory read model (readmodels/directory.py): rows, the tracking
-- record written in the same transaction, and event positions for read-your-writes.
-- depends: 0001.event-store
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE IF NOT EXISTS directory_patients (
    id uuid PRIMARY KEY,
    version bigint NOT NULL,
    position bigint NOT NULL,
    name text NOT NULL,
    name_key text NOT NULL,
    email text NOT NULL,
    email_key text NOT NULL,
    address text NOT NULL,
    date_of_birth date NOT NULL,
    registered_date date NOT NULL,
    removed boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS directory_patients_name
    ON directory_patients (name_key, id) WHERE NOT removed;
CREATE INDEX IF NOT EXISTS directory_patients_registered
    ON directory_patients (registered_date, id) WHERE NOT removed;
CREATE INDEX IF NOT EXISTS directory_patients_dob
    ON directory_patients (date_of_birth, id) WHERE NOT removed;
CREATE INDEX IF NOT EXISTS directory_patients_email
    ON directory_patients (email_key) WHERE NOT removed;
CREATE INDEX IF NOT EXISTS directory_patients_name_trgm
    ON directory_patients USING gin (name_key gin_trgm_ops) WHERE NOT removed;

CREATE TABLE IF NOT EXISTS projection_tracking (
    projection text PRIMARY KEY,
    position bigint NOT NULL DEFAULT 0,
    applied bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS directory_positions (
    position bigint PRIMARY KEY,
    patient_id uuid NOT NULL
);
-- A directory built before positions were recorded: each patient's last position.
INSERT INTO directory_positions (position, patient_id)
SELECT position, id FROM directory_patients
ON CONFLICT DO NOTHING;
