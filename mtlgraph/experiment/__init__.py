"""Declared experiments: the YAML schema and its validation, building objects from a config,
and the command line. The top layer: nothing else in mtlgraph imports it.
"""

__all__ = ["build", "cli", "config"]  # the modules (imported on use: the CLI starts fast)
