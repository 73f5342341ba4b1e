-- Idempotency keys of the command API's creates (commands/idempotency.py): one row per
-- (operation, the acting user, the client's Idempotency-Key), holding a hash of the
-- request it came with and the id the created resource gets. The row is written before
-- the resource, so a retry (after a lost answer, even after a crash) finds the id and
-- the resource saved under it, never makes a second. Rows older than 24 hours are
-- ignored, replaced on their key's next use and deleted; they hold no personal data.
-- depends: 0011.auth-revocations
CREATE TABLE IF NOT EXISTS idempotency_keys (
    operation text NOT NULL,
    actor text NOT NULL,
    key text NOT NULL,
    request_hash bytea NOT NULL,
    resource_id uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (operation, actor, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at ON idempotency_keys (created_at);
