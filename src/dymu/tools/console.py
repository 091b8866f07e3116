"""What every command prints to the console beside its results."""

from __future__ import annotations

import os
import sys


def loading(what: str) -> None:
    """Say what is loading before the seconds of silence it takes (imports, weights); rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(f"loading {what}…", file=sys.stderr, flush=True)
