"""Benchmarks: each answers one question with a command, a table and a JSON result."""
