-- The directory keeps the name split into given and family names (PatientRegistered v2).
-- Rows projected before it have none until `carelog projections rebuild directory`.
-- depends: 0005.appointments
ALTER TABLE directory_patients ADD COLUMN IF NOT EXISTS given_name text;
ALTER TABLE directory_patients ADD COLUMN IF NOT EXISTS family_name text;
