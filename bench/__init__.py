"""Benchmarks (not tests): timed comparisons on the machine they run on."""
