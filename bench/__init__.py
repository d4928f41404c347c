"""Benchmarks (`make bench`): they print figures, they assert nothing."""
