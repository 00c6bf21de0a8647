"""Interfaces that code outside attnstore is written against (implementations live elsewhere).

- :mod:`attnstore.abc.analysis`: the analysis plug-in protocol (``schemas/analyses.md``).
"""
