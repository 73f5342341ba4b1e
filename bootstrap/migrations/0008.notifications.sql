-- The notifier's ledger (notifications/ledger.py, readmodels/notifications.py): one row
-- per (cause, purpose, recipient), so nothing is sent twice; what it keeps after sending
-- is ids, purposes and states, never an address or a text.
-- depends: 0007.analytics
CREATE TABLE IF NOT EXISTS notifications (
    id uuid PRIMARY KEY,
    patient_id uuid NOT NULL,
    purpose text NOT NULL,
    source text NOT NULL,
    status text NOT NULL
        CHECK (status IN ('pending', 'sending', 'sent', 'failed-retrying', 'given-up')),
    attempts int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    details jsonb,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (next_attempt_at)
    WHERE status IN ('pending', 'failed-retrying');
CREATE INDEX IF NOT EXISTS notifications_patient ON notifications (patient_id, created_at);

-- What the notifier learns from the streams: which patient an appointment is for, and
-- whether a patient wants reminders.
CREATE TABLE IF NOT EXISTS notification_appointments (
    id uuid PRIMARY KEY,
    patient_id uuid NOT NULL
);
CREATE TABLE IF NOT EXISTS notification_preferences (
    patient_id uuid PRIMARY KEY,
    reminders boolean NOT NULL,
    version bigint NOT NULL
);
