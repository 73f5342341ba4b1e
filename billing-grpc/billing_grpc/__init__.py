"""Billing: a gRPC service (grpclib, port 9001) that owns billing accounts, invoices and
payments, opens an account for every registered patient, and publishes `billing.events`."""
