-- The auth service's users and refresh-token families (auth/service.py).
-- depends: 0001.event-store
CREATE SCHEMA IF NOT EXISTS auth;

CREATE TABLE IF NOT EXISTS auth.users (
    id uuid PRIMARY KEY,
    email text NOT NULL,
    password_hash text NOT NULL,
    role text NOT NULL
        CHECK (role IN ('admin', 'clinician', 'receptionist', 'billing', 'analyst')),
    disabled boolean NOT NULL DEFAULT false,
    development_only boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS users_email ON auth.users (email);

CREATE TABLE IF NOT EXISTS auth.refresh_tokens (
    token_hash bytea PRIMARY KEY,
    family uuid NOT NULL,
    user_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    issued_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at timestamptz,
    revoked_at timestamptz
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family ON auth.refresh_tokens (family);
CREATE INDEX IF NOT EXISTS refresh_tokens_user ON auth.refresh_tokens (user_id);
