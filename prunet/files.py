"""Files are written whole: the one atomic-write helper of the package.

Every file prunet writes (checkpoints, run summaries, reports, tables, figures,
downloads) goes through :func:`atomic_path`: the content is written under a
temporary name in the destination folder, flushed to disk, and renamed over the
destination. A reader, or a later run after a crash, a Ctrl-C or a full disk,
sees either the old file or the new one, never half of one.

Example:
    >>> import torch
    >>> from safetensors.torch import save_file
    >>> write_text("runs/x/summary.json", '{"compression": 12.5}')  # parent folders are made
    PosixPath('runs/x/summary.json')
    >>> with atomic_path("runs/x/final.safetensors") as tmp:
    ...     save_file({"fc1.weight": torch.zeros(3, 4)}, tmp)  # any writer that takes a path
    >>> sorted(p.name for p in Path("runs/x").iterdir())  # no temporary file left behind
    ['final.safetensors', 'summary.json']
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

HIDDEN_PREFIX = ".prunet"  # prunet's own files and folders in a run folder (manifest, lock, aside, resume point)


class WriteFailed(OSError):
    """A file could not be written whole (a full disk, most often); nothing of it was left behind.

    An ``OSError`` whatever the writer raised (torch's writer raises ``RuntimeError``,
    safetensors its own error): ``filename`` is the file, ``strerror`` one line saying
    why and how much room its folder has.
    """


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    The caller writes the whole file to the yielded path (by name, with any
    library). After the block the file is fsynced, given a normal file mode
    (``0666`` less the umask; ``mkstemp`` makes it private) and renamed over
    ``path``. Parent folders are created.

    Args:
        path: the destination.

    Yields:
        The temporary path, in the destination's folder (so the rename is atomic),
        hidden (``.name.XXXX.tmp.suffix``).
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a device (/dev/null as root), a FIFO, a folder: never replaced
        raise WriteFailed(errno.EEXIST, "is not a regular file; prunet writes only files of its own (choose another "
                                        "name)", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, and ending in the destination's suffix: writers that infer the format
    # from the name (matplotlib's savefig) write the right one.
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as e:
        raise _failed(path, e, 0) from e
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or not _write_error(e):
            raise
        raise _failed(path, e, written) from e
    _fsync_dir(path.parent)  # the rename itself survives a power cut


def _write_error(e: BaseException) -> bool:
    """Whether ``e`` is a writer's failure to write (torch's and safetensors' errors are no ``OSError``)."""
    if isinstance(e, WriteFailed):
        return False  # already told
    if isinstance(e, OSError):
        return True
    text = str(e)
    return any(sign in text for sign in ("No space left on device", "os error 28", "unexpected pos",
                                         "file write failed", "PytorchStreamWriter failed"))


def _failed(path: Path, e: BaseException, written: int) -> WriteFailed:
    """The one-line error for a file not written: the disk's own words where it is full, and the room left."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "os error 28" in str(e) or \
        (free is not None and free < max(written, 1) + 2**20)
    room = f"{_size(free)} free in {path.parent}" if free is not None else f"in {path.parent}"
    if full:
        need = f"; it needed more than the {_size(written)} written before it failed" if written else ""
        return WriteFailed(errno.ENOSPC, f"No space left on device ({room}{need}); free some space and run "
                                         f"the command again", str(path))
    detail = (getattr(e, "strerror", None) or str(e).splitlines()[0] if str(e) else type(e).__name__)
    return WriteFailed(getattr(e, "errno", None) or errno.EIO, f"could not be written ({detail}; {room})", str(path))


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n}"


def name_problem(text: str) -> str | None:
    """Why ``text`` cannot name a folder prunet writes a run in (a recipe's ``name``, ``output_dir``,
    ``--run-dir``); None when it can.

    Example:
        >>> name_problem("runs/lenet"), name_problem("runs/.prunet-previous")
        (None, "names prunet's own hidden folder '.prunet-previous'")
    """
    if not text.strip():
        return "is empty"
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"holds a control character ({bad!r})"
    hidden = next((part for part in Path(text).parts if part.startswith(HIDDEN_PREFIX)), None)
    if hidden is not None:
        return f"names prunet's own hidden folder {hidden!r}"
    return None


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole (see :func:`atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` whole (see :func:`atomic_path`); returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened (some file systems): the data itself is synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: reading it sets the process umask for an instant, which a
# thread creating a file at that moment would see.
_UMASK = _read_umask()
