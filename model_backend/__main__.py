"""`python -m model_backend ...` — see model_backend/cli.py."""

from model_backend.cli import main

raise SystemExit(main())
