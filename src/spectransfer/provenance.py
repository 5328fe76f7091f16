"""Provenance and safe writing for every output: versions in FITS headers, atomic renames.

Outputs follow redrock's habits: the header names the program version and each dependency
version (DEPNAMnn / DEPVERnn), and files are written under a temporary name in the same
folder, then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from spectransfer import __version__
from spectransfer.errors import OutputError

_UMASK = os.umask(0)
os.umask(_UMASK)

DEPENDENCIES = ("numpy", "astropy", "pyarrow", "zarr", "torch", "onnxruntime", "dask")


def dependency_versions() -> dict[str, str]:
    """Installed versions of the main dependencies (missing ones are left out)."""
    out = {"spectransfer": __version__}
    for name in DEPENDENCIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def provenance_cards() -> list[tuple[str, str, str]]:
    """FITS header cards (key, value, comment): STVER plus DEPNAMnn/DEPVERnn as redrock writes."""
    cards: list[tuple[str, str, str]] = [("STVER", __version__, "spectransfer version")]
    deps = {k: v for k, v in dependency_versions().items() if k != "spectransfer"}
    for i, (name, ver) in enumerate(sorted(deps.items())):
        cards.append((f"DEPNAM{i:02d}", name, "dependency"))
        cards.append((f"DEPVER{i:02d}", ver, f"{name} version"))
    return cards


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# Errors of writing the temporary file that mean "this output cannot be written", not a bug.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO)


def output_target(target: str | os.PathLike[str]) -> Path:
    """The file an output path really names: a symlink's target; refuses anything not a regular file.

    A new path is fine; an existing device, FIFO, socket or folder is never replaced (renaming
    a temporary file onto /dev/full would turn the device into a regular file).
    """
    path = Path(target)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        st = path.stat()
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise OutputError(f"{target}: cannot write here ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{target}: is {_kind(st.st_mode)}, not a regular file; refusing to replace it")
    return path


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"


def check_writable_dir(folder: str | os.PathLike[str]) -> Path:
    """OutputError unless ``folder`` is, or could be made as, a folder where files can be written.

    Creates nothing: the nearest existing ancestor must be a folder that accepts a new file
    (probed with a temporary file, removed at once). Called before expensive work, so a
    read-only, immutable or /proc folder, or one below a regular file, fails in a second
    rather than after an hour of scoring.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder")
    base = folder.absolute()
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"{folder}: {base} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write in {base} ({exc.strerror or exc})") from exc
    return folder


def check_writable_file(target: str | os.PathLike[str]) -> Path:
    """OutputError unless ``target`` can be written atomically: a regular file or a new name
    (a symlink counts as its target) in a writable folder. Returns the real target."""
    path = output_target(target)
    try:
        check_writable_dir(path.parent)
    except OutputError as exc:
        raise OutputError(f"{target}: {str(exc).split(': ', 1)[1]}") from exc
    return path


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success.

    A symlink is followed (the temporary file goes beside its target, which is replaced);
    anything but a regular file or a new path is refused before a byte is written. A full
    disk or read-only folder becomes an OutputError naming ``target``.
    """
    real = output_target(target)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write here ({exc.strerror or exc})") from exc
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as exc:
            if exc.errno in _WRITE_ERRNOS:
                raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
            raise
        except Exception as exc:
            # Writers in other languages (safetensors, onnx) report a full disk in their own
            # exception types; the message still carries the C library's text.
            if os.strerror(errno.ENOSPC) in str(exc) or _disk_full(real.parent):
                raise OutputError(f"{target}: cannot write ({os.strerror(errno.ENOSPC)})") from exc
            raise
        try:
            os.replace(tmp_path, real)
        except OSError as exc:
            raise OutputError(f"{target}: cannot replace ({exc.strerror or exc})") from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _disk_full(folder: Path) -> bool:
    """True when the file system holding ``folder`` has no block left (torch.save only says 'write failed')."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail == 0


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
