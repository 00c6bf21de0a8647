"""Built-in analyses (the plug-in protocol of :mod:`attnstore.abc.analysis`).

- :mod:`attnstore.analyses.sparsity`: where each head's attention goes by position (sinks, a
  recent window, DuoAttention's streaming budget, reach, heavy columns and diagonals) and the
  needle probe's retrieval score (``schemas/sparsity.md``).
"""
