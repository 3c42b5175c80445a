"""``python -m mtlgraph``: the command line (see :mod:`mtlgraph.cli`)."""

from mtlgraph.cli import main

raise SystemExit(main())
