"""Metrics: plain counters on the hot path (counters.py), a prometheus-client collector that reads
them at scrape time (collector.py), and the HTTP endpoint Prometheus scrapes (endpoint.py)."""
