"""``python -m meshd``: the same as the ``meshd`` command."""

from ._main import main

raise SystemExit(main())
