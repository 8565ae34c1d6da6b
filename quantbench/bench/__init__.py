"""Benchmarks behind ``make bench``; each writes a markdown report under reports/bench/."""
