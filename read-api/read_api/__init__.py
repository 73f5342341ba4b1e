"""The query API: paged, filtered, cached reads of the read models."""
