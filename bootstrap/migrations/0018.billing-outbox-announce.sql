-- Billing's outbox announces its inserts on the channel carelog_billing_outbox, at commit,
-- once per statement: its publisher (billing-grpc/billing_grpc/outbox.py) LISTENs and reads
-- when told, instead of reading the table every 20 ms while nothing happens.
-- depends: 0017.audit-patient-sets
CREATE OR REPLACE FUNCTION billing.announce_outbox() RETURNS trigger
LANGUAGE plpgsql AS $BODY$
BEGIN
    NOTIFY "carelog_billing_outbox";
    RETURN NULL;
END;
$BODY$;

CREATE OR REPLACE TRIGGER outbox_announce
    AFTER INSERT ON billing.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION billing.announce_outbox();
