"""``python -m augserver``: the command line (see :mod:`augserver.cli`)."""

from augserver.cli import main

raise SystemExit(main())
