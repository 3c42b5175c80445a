"""``python -m mtlgraph``: the command line (see :mod:`mtlgraph.experiment.cli`)."""

from mtlgraph.experiment.cli import main

raise SystemExit(main())
