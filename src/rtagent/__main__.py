"""``python -m rtagent``: the same as the ``rtagent`` command."""

from ._cli import main

raise SystemExit(main())
