-- Which key the email claims are keyed under (commands/claims.py): a fingerprint of
-- CARELOG_CLAIM_KEY (an HMAC of a fixed label under it, which tells nothing of the key),
-- recorded by the first command API to start on the store and by `carelog claims rekey`
-- once every claim is keyed under it. A command API with another key refuses to start
-- (its claims would not meet the stored ones, and emails would no longer be unique);
-- `carelog db migrate` rekeys the claims when it finds the key changed.
-- depends: 0011.auth-revocations
CREATE TABLE IF NOT EXISTS claim_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    fingerprint text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
