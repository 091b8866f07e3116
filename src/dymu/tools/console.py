"""What every command prints to the console beside its results: status lines and warnings."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

QUIET = False  # `--quiet`: no status lines (set by `dymu.cli.main`)


def loading(what: str) -> None:
    """Say what is loading before the seconds of silence it takes (imports, weights); rank 0 only."""
    if not QUIET and os.environ.get("RANK", "0") == "0":
        print(f"loading {what}…", file=sys.stderr, flush=True)


def warning_line(command: str, message) -> str:
    """One warning as the CLI prints it: ``dymu COMMAND: warning: MESSAGE`` on one line (a message that
    already starts with ``dymu:`` or ``dymu COMMAND:`` does not say it twice)."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    for prefix in (f"dymu {command}:", "dymu:"):
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
            break
    return f"dymu {command}: warning: {text}"


@contextlib.contextmanager
def one_line_warnings(command: str, raw: bool = False):
    """While a command runs, Python warnings (CalibrationWarning, the KV cache fallbacks, library
    warnings) print as `warning_line`s on stderr instead of Python's two lines with a file and line
    number; each distinct message once. ``raw`` (``--debug``) keeps Python's own format."""
    if raw:
        yield
        return
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = warning_line(command, message)
        if text not in shown:
            shown.add(text)
            print(text, file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        # every user-facing warning of this run shows (deduplicated above), also one an earlier run in the
        # same process already showed: Python's per-location registry would hide it
        warnings.simplefilter("default", UserWarning)
        warnings.showwarning = show
        yield
