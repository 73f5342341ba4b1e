-- Each patient's (subject's) data key, wrapped under the master key (runtime.crypto).
-- Erasure sets `wrapped` to NULL and keeps the row, so no key is ever made for the
-- subject again: every sealed copy of its personal fields stays unreadable.
-- depends: 0011.auth-revocations
CREATE TABLE IF NOT EXISTS subject_keys (
    subject_id uuid PRIMARY KEY,
    wrapped bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    erased_at timestamptz,
    CHECK ((wrapped IS NULL) = (erased_at IS NOT NULL))
);

-- An erased patient's directory row is a tombstone: blank personal fields, no date of
-- birth, `erased` (the query API answers 410 Gone for it).
ALTER TABLE directory_patients ADD COLUMN IF NOT EXISTS erased boolean NOT NULL DEFAULT false;
ALTER TABLE directory_patients ALTER COLUMN date_of_birth DROP NOT NULL;

-- Analytics keeps an erased patient's registration (counts stay) but not their date of
-- birth (they leave the age bands).
ALTER TABLE analytics_patients ALTER COLUMN date_of_birth DROP NOT NULL;
