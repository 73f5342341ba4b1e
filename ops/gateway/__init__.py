"""The HAProxy gateway: its configuration template, docs page and generator."""
