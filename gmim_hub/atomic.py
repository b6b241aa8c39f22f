"""The one way gmim-hub writes a file: to a temporary file beside it, fsynced, then `os.replace`d into place (and
`sha256_file`, the one way it hashes a file).

- A failure (an exception, a full disk, a kill) never leaves a half-written file under the final name, and the file
  that was there before stays as it was.
- The temporary file is created with mode 0o666 filtered by the process umask, exactly as `open(path, "w")` would
  create it, and keeps that mode even when a library replaces it while writing, so outputs get the permissions any
  new file gets (`tempfile.mkstemp`, and safetensors' own writer, give 0600: owner only).
- A full disk, a quota or a file-size limit (ENOSPC, EDQUOT, EFBIG, also when a library wraps them as PyTorch's
  zip writer does) and a folder without write permission become one `OutputError` line saying what happened.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from gmim_hub.errors import OutputError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}
_TEMP_MARK = ".tmp-"


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside `path` that keeps its suffixes (nibabel picks gzip from '.nii.gz')."""
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def is_temp_name(name: str) -> bool:
    """True for the names `temp_path` makes (leftovers of a killed writer, safe to delete)."""
    return name.startswith(".") and _TEMP_MARK in name


@contextmanager
def atomic_write(path: str | Path, *, temp_name: str | None = None) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; when the block ends, move it onto `path`.

    temp_name: a fixed temporary name in the same folder (a stale one is replaced) for callers whose recovery
    code looks for it; by default a fresh hidden name (`temp_path`)."""
    path = Path(path)
    with atomic_writes([path], temp_names=None if temp_name is None else [temp_name]) as (tmp,):
        yield tmp


@contextmanager
def atomic_writes(paths: Sequence[str | Path], *, temp_names: Sequence[str] | None = None) -> Iterator[list[Path]]:
    """`atomic_write` for several files that belong together (a label map and its probabilities): every file is
    written to its temporary path first and only then are all moved into place, so an error leaves none of them."""
    finals = [Path(p) for p in paths]
    tmps: list[Path] = []
    mode = 0o644
    try:
        for i, final in enumerate(finals):
            tmp = final.with_name(temp_names[i]) if temp_names is not None else temp_path(final)
            if temp_names is not None:
                tmp.unlink(missing_ok=True)  # a stale one from a killed writer
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
            mode = tmp.stat().st_mode & 0o777  # what any new file gets here
            tmps.append(tmp)
        yield list(tmps)
        for tmp in tmps:
            os.chmod(tmp, mode)  # writers that replace the file (safetensors does, with 0600) lose the umask's mode
            _fsync(tmp)
        for tmp, final in zip(tmps, finals, strict=True):
            os.replace(tmp, final)
        for folder in {f.parent for f in finals}:
            _fsync(folder)
    except BaseException as e:
        problem = explain_write_error(e, finals)
        if problem is not None:
            raise problem from e
        raise
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks (what `sha256sum` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def explain_write_error(error: BaseException, paths: Sequence[Path]) -> OutputError | None:
    """An `OutputError` for a full disk or a folder we may not write, found anywhere in `error`'s chain."""
    names = ", ".join(str(p) for p in paths)
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return OutputError(f"could not write {names}: {os.strerror(e.errno)} (the disk, a quota or a file-size "
                               "limit is full); nothing was written and what was there before is unchanged: free "
                               "some space or write somewhere else")
        if isinstance(e, OSError) and e.errno in _NO_PERMISSION:
            return OutputError(f"cannot write into {paths[0].parent} ({os.strerror(e.errno)}); choose a folder you "
                               "can write to, or fix its permissions")
        e = e.__cause__ or e.__context__
    return None


def describe_os_error(error: BaseException) -> str:
    """One line for an error: ours as they are; the system's (errno set) with the path and what to check."""
    if not isinstance(error, OSError) or error.strerror is None:
        return str(error)
    where = f"{error.filename}: " if error.filename is not None else ""
    if error.errno in _NO_SPACE:
        return f"{where}{error.strerror}; free some space or write somewhere else"
    return (f"{where}{error.strerror}; check the path (a file where a folder is needed, or the reverse?) and its "
            "permissions")


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some filesystems refuse fsync on a folder; never ignore it for a file
            raise
    finally:
        os.close(fd)
