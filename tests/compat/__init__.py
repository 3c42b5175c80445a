"""Tests of mtlgraph.compat (a package: its conftest and utils do not clash with tests/)."""
