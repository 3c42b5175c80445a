"""Compatibility layers for code written against other libraries' APIs.

- :mod:`mtlgraph.compat.snorkel`: Snorkel 0.10's ``snorkel.classification`` names and arguments
  (``from mtlgraph.compat.snorkel import MultitaskClassifier, Trainer, ...``); see
  ``docs/migrating-from-snorkel.md``.

This layer sits above ``experiment``: it may use every part of mtlgraph, and nothing in mtlgraph
uses it.
"""

__all__ = ["snorkel"]  # the module (imported on use)
