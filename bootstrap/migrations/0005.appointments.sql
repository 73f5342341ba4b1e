-- The appointments read model (readmodels/appointments.py): clinicians, their time off,
-- appointments, and the positions the projection has applied (read-your-writes).
-- depends: 0002.directory
CREATE TABLE IF NOT EXISTS clinicians (
    id uuid PRIMARY KEY,
    version bigint NOT NULL,
    position bigint NOT NULL,
    name text NOT NULL,
    name_key text NOT NULL,
    email text NOT NULL,
    timezone text NOT NULL,
    working_hours jsonb NOT NULL,
    user_id uuid,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS clinicians_name ON clinicians (name_key, id);
CREATE INDEX IF NOT EXISTS clinicians_user ON clinicians (user_id) WHERE user_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS clinician_time_off (
    clinician_id uuid NOT NULL,
    time_off_id uuid NOT NULL,
    start_at timestamptz NOT NULL,
    end_at timestamptz NOT NULL,
    PRIMARY KEY (clinician_id, time_off_id)
);
CREATE INDEX IF NOT EXISTS clinician_time_off_span ON clinician_time_off (clinician_id, start_at);

CREATE TABLE IF NOT EXISTS appointments (
    id uuid PRIMARY KEY,
    version bigint NOT NULL,
    position bigint NOT NULL,
    patient_id uuid NOT NULL,
    clinician_id uuid NOT NULL,
    start_at timestamptz NOT NULL,
    end_at timestamptz NOT NULL,
    duration_minutes int NOT NULL,
    reason text NOT NULL,
    status text NOT NULL,
    cancellation_reason text,
    booked_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS appointments_start ON appointments (start_at, id);
CREATE INDEX IF NOT EXISTS appointments_clinician ON appointments (clinician_id, start_at, id);
CREATE INDEX IF NOT EXISTS appointments_patient ON appointments (patient_id, start_at, id);

CREATE TABLE IF NOT EXISTS appointment_positions (
    position bigint PRIMARY KEY,
    aggregate_id uuid NOT NULL
);
