"""Compatibility layers for code written against other libraries' APIs: :mod:`.snorkel`
(``docs/migrating-from-snorkel.md``). Nothing in mtlgraph uses this layer.
"""

__all__ = ["snorkel"]  # the module (imported on use)
