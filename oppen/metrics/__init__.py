"""Prometheus metrics: the catalog of names (catalog.py) and the two places they are served from."""
