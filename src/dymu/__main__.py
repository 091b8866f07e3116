"""`python -m dymu`: the `dymu` command."""

import sys

from .cli import main

sys.exit(main())
