"""Benchmarks: each measures edgepack against the anchor its issue names and prints a table (+ --json)."""
