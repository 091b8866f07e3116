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


def show_progress() -> bool:
    """Bars only on a terminal (stderr) and never under --quiet: a log file or pipe gets no bar lines."""
    return not QUIET and sys.stderr.isatty() and os.environ.get("RANK", "0") == "0"


def progress(total: int, desc: str, unit: str = "img", quiet: bool = False):
    """A tqdm bar with an ETA over ``total`` items on stderr (off under --quiet / ``quiet`` and when not
    a terminal). Use as a context manager; ``bar.update(n)``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet or not show_progress())


class Steps:
    """A bar over the steps of a command that runs a few long steps (`dymu demo`, `dymu bench`): the
    current step's name and an ETA from the steps done so far. ``say`` prints a line of the command's
    own output above the bar, so the two do not garble each other."""

    def __init__(self, total: int, desc: str, out=print):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=not show_progress(),
                         bar_format="{desc}: {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}]{postfix}")
        self._out = out
        self._started = False

    def next(self, name: str) -> None:
        """The previous step is done; ``name`` runs now."""
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_postfix_str(name)

    def set_total(self, total: int) -> None:
        """Once the command knows how many steps it runs."""
        self._bar.total = total
        self._bar.refresh()

    def say(self, text: str = "", file=None) -> None:
        """One line of output: to ``file``, else through the command's ``out`` (stdout by default)."""
        if self._bar.disable or (file is None and self._out is not print):
            if file is None:
                self._out(text)
            else:
                print(text, file=file, flush=True)
        else:
            self._bar.write(text, file=file or sys.stdout)

    def close(self) -> None:
        if self._started:
            self._bar.update(1)
        self._bar.close()

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
