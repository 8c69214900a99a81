"""``python -m benchmarks.load``: run every load comparison and write the results JSON."""

from .run import main

raise SystemExit(main())
