-- Revoked access tokens, written by the auth service (auth/service.py) and followed by
-- every process that verifies tokens (runtime/security.py's RevocationFeed):
--   kind 'subject', key = a disabled user's id: their tokens issued at or before
--     revoked_at (by the issuer's clock) are refused;
--   kind 'session', key = a logged-out refresh family (the tokens' `sid`): all refused.
-- A row is kept until expires_at, when every token it refuses has expired anyway.
-- A trigger announces each row written on the channel carelog_revocations, at commit.
-- depends: 0003.auth
CREATE TABLE IF NOT EXISTS auth.revocations (
    kind text NOT NULL CHECK (kind IN ('subject', 'session')),
    key text NOT NULL,
    revoked_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS revocations_expiry ON auth.revocations (expires_at);

CREATE OR REPLACE FUNCTION auth.announce_revocation() RETURNS trigger
LANGUAGE plpgsql AS $BODY$
BEGIN
    PERFORM pg_notify('carelog_revocations', json_build_object(
        'kind', NEW.kind,
        'key', NEW.key,
        'cutoff', floor(extract(epoch FROM NEW.revoked_at))::bigint,
        'expiresAt', ceil(extract(epoch FROM NEW.expires_at))::bigint
    )::text);
    RETURN NULL;
END;
$BODY$;

CREATE OR REPLACE TRIGGER revocations_announce
    AFTER INSERT OR UPDATE ON auth.revocations
    FOR EACH ROW EXECUTE FUNCTION auth.announce_revocation();
