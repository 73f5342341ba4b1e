-- The event store: every aggregate's events, in one global order (notification_id).
-- The layout is the one the event-sourcing library's PostgreSQL recorder expects
-- for an application named "carelog"; the services start with table creation off.
CREATE TABLE IF NOT EXISTS carelog_events (
    originator_id uuid NOT NULL,
    originator_version bigint NOT NULL,
    topic text,
    state bytea,
    notification_id bigserial,
    PRIMARY KEY (originator_id, originator_version)
) WITH (
    autovacuum_enabled = true,
    autovacuum_vacuum_threshold = 100000000,
    autovacuum_vacuum_scale_factor = 0.5,
    autovacuum_analyze_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.01
);

CREATE UNIQUE INDEX IF NOT EXISTS carelog_events_notification_id_idx
    ON carelog_events (notification_id ASC);

DO $BODY$
BEGIN
    CREATE TYPE stored_event_uuid AS (
        originator_id uuid, originator_version bigint, topic text, state bytea
    );
EXCEPTION WHEN duplicate_object THEN NULL;
END;
$BODY$;

CREATE OR REPLACE FUNCTION es_insert_events_uuid(events stored_event_uuid[])
RETURNS SETOF bigint LANGUAGE plpgsql AS $BODY$
BEGIN
    SET LOCAL lock_timeout = '0s';
    NOTIFY "carelog_events";
    RETURN QUERY
    INSERT INTO carelog_events AS t (originator_id, originator_version, topic, state)
    SELECT originator_id, originator_version, topic, state
    FROM unnest(events)
    RETURNING notification_id;
END;
$BODY$;

-- How far each relay has published the store's log to Kafka.
CREATE TABLE IF NOT EXISTS relay_positions (
    relay text PRIMARY KEY,
    position bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
