"""Provenance and safe writing for every output: versions in FITS headers, atomic renames.

Outputs follow redrock's habits: the header names the program version and each dependency
version (DEPNAMnn / DEPVERnn), and files are written under a temporary name in the same
folder, then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from spectransfer import __version__

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


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
