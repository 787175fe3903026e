"""`python -m model_backend.bench` (`make bench`)."""

import sys

from model_backend.bench.run import main

sys.exit(main())
