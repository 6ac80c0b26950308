"""The sections of ``experiments/benchmark.py``, one module each.

Each section is a ``run(...)`` taking its settings as arguments (flags stay
in ``benchmark.py``) and returning JSON rows, and a ``markdown(rows)`` that
prints the README's table from them.
"""
