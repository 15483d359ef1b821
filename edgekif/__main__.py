"""`python -m edgekif`: the library's commands (no daemon)."""

import sys

from .cli import main

sys.exit(main())
