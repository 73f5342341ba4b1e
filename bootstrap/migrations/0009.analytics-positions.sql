-- analytics_positions records only the event store's positions from now on (billing's
-- events are numbered by its outbox, a different sequence): forget those recorded so far.
-- depends: 0008.notifications
DELETE FROM analytics_positions p
WHERE EXISTS (SELECT 1 FROM billing.accounts a WHERE a.id = p.aggregate_id);
