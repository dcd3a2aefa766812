"""Convergence steps: each knows one part of the host (files, key, groups, service, ...).

A step plans (reads the live state, renders the desired one, says what would change, with
a redacted diff) and applies (writes through the :class:`dtsetup.txn.Transaction`, so that
a later failure can undo it). Steps never write while planning.
"""
