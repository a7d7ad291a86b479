"""Benchmarks: real processes electing a leader over a private Redis, measured from outside.

Run ``nox -s bench`` (or ``python -m benchmarks --quick``); ``benchmarks/README.md`` says what
each figure means and what bounds it.
"""
