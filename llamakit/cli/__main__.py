"""`python -m llamakit.cli`, the same as `python -m llamakit`."""

import sys

from llamakit.cli import main

sys.exit(main())
