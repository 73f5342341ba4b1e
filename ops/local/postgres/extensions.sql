-- Extensions the carelog database needs. Run as a superuser, connected to the
-- carelog database: by ops/local/stack.sh (native stack) and by the postgres
-- image's /docker-entrypoint-initdb.d (compose.yaml). Must stay idempotent.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
