-- The disclosure audit's spool (runtime/audit_spool.py): each query API process appends
-- its records to a file of its own before answering and ships them here. A segment's mark
-- is how many of its bytes are stored; it is written in the same statement as the records
-- it covers, so a shipment sent again after a failure starts where the last one that
-- landed ended: every record stored once. Marks of segments shipped whole and removed are
-- deleted; they are bookkeeping, not audit records.
-- depends: 0018.billing-outbox-announce
CREATE TABLE IF NOT EXISTS audit.spool_marks (
    segment text PRIMARY KEY,
    shipped bigint NOT NULL CHECK (shipped >= 0)
);
