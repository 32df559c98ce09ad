"""``python -m palisade``: the same as the ``palisade`` console script."""

from palisade.cli.main import main

raise SystemExit(main())
