"""The runtime kit: settings, logs, database, HTTP, Kafka and the one ordered publisher.

Every carelog process stands on it; it imports no service.
"""
