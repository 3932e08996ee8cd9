"""``python -m autobatch``: the same as the ``autobatch`` command."""

from autobatch.cli import main

raise SystemExit(main())
