"""Projections: Kafka consumers that build read models from published events."""
