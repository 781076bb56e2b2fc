"""``python -m bench`` (what ``make bench`` runs): see bench.run."""

from __future__ import annotations

from bench.run import main

raise SystemExit(main())
