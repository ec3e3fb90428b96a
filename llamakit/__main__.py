"""`python -m llamakit` (also what torchrun runs with -m llamakit)."""

import sys

from llamakit.cli import main

sys.exit(main())
