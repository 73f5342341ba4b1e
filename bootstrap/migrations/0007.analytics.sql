-- The analytics read model (readmodels/analytics.py): one row of facts per patient,
-- appointment and money movement, kept by the analytics projection; the answers are
-- counts and sums over them, never personal data.
-- depends: 0006.directory-name-parts
CREATE TABLE IF NOT EXISTS analytics_patients (
    id uuid PRIMARY KEY,
    version bigint NOT NULL,
    position bigint NOT NULL,
    registered_date date NOT NULL,
    date_of_birth date NOT NULL,
    removed_at timestamptz
);
CREATE INDEX IF NOT EXISTS analytics_patients_registered ON analytics_patients (registered_date);
CREATE INDEX IF NOT EXISTS analytics_patients_removed ON analytics_patients (removed_at)
    WHERE removed_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS analytics_appointments (
    id uuid PRIMARY KEY,
    version bigint NOT NULL,
    position bigint NOT NULL,
    clinician_id uuid NOT NULL,
    booked_at timestamptz NOT NULL,
    start_at timestamptz NOT NULL,
    status text NOT NULL
);
CREATE INDEX IF NOT EXISTS analytics_appointments_start ON analytics_appointments (start_at);

CREATE TABLE IF NOT EXISTS analytics_money (
    id uuid PRIMARY KEY,
    position bigint NOT NULL,
    kind text NOT NULL CHECK (kind IN ('invoiced', 'paid')),
    currency char(3) NOT NULL,
    amount_minor bigint NOT NULL,
    occurred_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS analytics_money_at ON analytics_money (currency, occurred_at);

CREATE TABLE IF NOT EXISTS analytics_positions (
    position bigint PRIMARY KEY,
    aggregate_id uuid NOT NULL
);
