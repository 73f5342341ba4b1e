-- Snapshots of long-lived aggregates (a patient with a long history): rebuilding one
-- reads its newest snapshot and only the events after it. Same layout as the event
-- store, as the event-sourcing library's snapshot recorder expects for "carelog".
-- A snapshot is a cache of what the events say: deleting them all loses nothing.
-- depends: 0009.analytics-positions
CREATE TABLE IF NOT EXISTS carelog_snapshots (
    originator_id uuid NOT NULL,
    originator_version bigint NOT NULL,
    topic text,
    state bytea,
    PRIMARY KEY (originator_id, originator_version)
);
