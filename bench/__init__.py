"""Reproducible benchmarks: programs that print a table and write JSON (and PNG plots)."""
