"""Benchmarks and capacity plans (scripts, not tests): cold start, VRAM plan, GPU timings.

Each script prints a table and writes JSON; `docs/performance.md` explains the figures.
"""
