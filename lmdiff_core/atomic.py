"""Atomic writes: a file or folder appears at its path complete, or not at all (a failed or killed run never
replaces a good output with a partial one)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path, folder: bool = False, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a hidden temporary path beside `path` (`.<name>.<random><suffix>`, in the same folder) to write to.

    When the block ends normally the temporary file (or, with `folder=True`, folder) is renamed onto `path` with
    the usual permissions, replacing what was there; when it raises, the temporary is removed and `path` is left
    as it was. The parent folder must exist.
    """
    path = Path(path)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if folder:
            _replace_folder(tmp, path)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Rename `tmp` onto `folder`; an existing folder is moved aside first and removed after (a folder cannot be
    replaced by one rename)."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
