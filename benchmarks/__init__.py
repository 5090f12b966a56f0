"""Benchmarks for authsessions: ``.venv/bin/python -m benchmarks [--quick]``.

See ``benchmarks/README.md`` for what each part measures and today's numbers.
"""
