"""Writing output files safely: checked before the work starts, written atomically, locked while in use."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import sys
import tempfile
from pathlib import Path

STDOUT = "-"  # `--json -`: print to stdout instead of writing a file


def check_output_file(path: str | Path, what: str = "output file", inputs=()) -> Path:
    """Refuse, before any work is done, an output path that could not be written at the end:
    a folder, a missing or read-only parent folder, or one of the command's ``inputs`` (see
    `check_not_an_input`). ``what`` names it in the error (e.g. "--out")."""
    check_not_an_input(path, inputs, what)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise ValueError(f"{what} {path} exists and is not a regular file")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: folder {parent} is not writable")
    return path


def check_json_output(path: str | Path, what: str = "--json", inputs=()) -> Path | None:
    """`check_output_file` for a ``--json FILE`` option, where ``-`` means stdout (returns None)."""
    if str(path) == STDOUT:
        return None
    return check_output_file(path, what, inputs=inputs)


def write_json(path: str | Path, data, **dumps) -> Path | None:
    """Write ``data`` as JSON to ``path`` atomically (`atomic_write_text`), or to stdout for ``-``."""
    text = json.dumps(data, **dumps) + "\n"
    if str(path) == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
        return None
    return atomic_write_text(path, text)


def check_not_an_input(out: str | Path, inputs, what: str, out_is_folder: bool = False) -> None:
    """Refuse an output that would overwrite or be read back as one of the command's inputs: the same
    path as an input, or (``out_is_folder``: a folder of outputs such as analyze's pictures) a folder
    inside an input folder, whose outputs the next run would read as inputs. ``inputs``: the paths the
    command reads (files or folders; missing ones ignored). A file written into an input folder is fine
    (``--out model_dir/mid.json``): commands read only their own kinds of files from folders."""
    out = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        path = Path(given)
        if not path.exists():
            continue
        source = path.resolve()
        if source == out:
            raise ValueError(f"{what} {given} is also an input of this command; writing it would overwrite it: "
                             "choose another path")
        if out_is_folder and source.is_dir() and out.is_relative_to(source):
            raise ValueError(f"{what} {out} is inside the input folder {given}: the next run would read its own "
                             "outputs as inputs; choose a folder outside it")


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` all or nothing. The temporary file is created with O_EXCL under a
    random name in the same folder (tempfile), so a planted symlink is never followed, and then
    renamed over ``path`` (os.replace: atomic on POSIX and Windows within one file system)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give it the mode of any file the user creates
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _remove_stale_temporaries(path)
    return path


STALE_SECONDS = 60


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of ``path`` left by a writer that was killed (kill -9 skips the cleanup above):
    removed by the next successful write once a minute old (a write takes well under that)."""
    import time

    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - leftover.lstat().st_mtime > STALE_SECONDS:
                leftover.unlink()


class LockedError(RuntimeError):
    """Another process holds the lock of a file dymu is about to write."""


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str):
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the block, or raise
    LockedError at once. The kernel releases it when the process dies, so a killed run leaves no
    stale lock. ``what`` says what is being protected, for the message."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking
        yield
        return
    path = Path(path)
    while True:
        try:  # O_NOFOLLOW: a symlink planted at the lock's name must not make us create or lock its target
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            if path.is_symlink():
                raise ValueError(f"lock file {path} is a symbolic link; remove it (dymu never follows one)") from None
            raise ValueError(f"cannot open lock file {path}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"{what} is in use by another process (lock {path}); wait for it to finish "
                              "or write to another file") from None
        # The previous holder may have removed the file between our open and our lock: retry then.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
