"""Benchmarks, each run as ``python -m ssl_kit.benchmarks.NAME``; they print figures."""
