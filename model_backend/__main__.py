"""`python -m model_backend ...` — see model_backend/cli.py."""

from .cli import main

raise SystemExit(main())
