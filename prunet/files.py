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
import os
import tempfile
from pathlib import Path
from typing import Iterator


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
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, and ending in the destination's suffix: writers that infer the format
    # from the name (matplotlib's savefig) write the right one.
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power cut


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
