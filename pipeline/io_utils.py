"""Small I/O helpers shared by the stages."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import secrets
from pathlib import Path

TMP_SUFFIX = ".tmp"
#: names of the temporary files atomic_write_bytes leaves behind when a process is killed mid-write
TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The bytes go to a temporary file in the same directory, then are renamed over ``path`` (a rename
    within one file system is atomic, so a killed process never leaves a partial file under the
    final name). ``durable`` also fsyncs before the rename, which survives a power cut too; bulk
    outputs that a rerun can regenerate skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # O_EXCL with mode 0o666: the umask applies as for open(), no chmod needed (mkstemp gives 0600)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def csv_text(header: list[str], rows) -> str:
    """A CSV document (``\n`` line ends, quoting as needed) from a header and rows."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()


def content_hash(data: bytes) -> str:
    """The content id of a file (blake2b, 128 bits, hex): the ingest cache key and synth's file list."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is that of a temporary file :func:`atomic_write_bytes` writes (then renames)."""
    return name.endswith(TMP_SUFFIX) and TMP_NAME.match(name) is not None


def remove_stale_temps(root: Path) -> int:
    """Delete temporary files that a killed :func:`atomic_write_bytes` left under ``root``; return how many.

    Call it at the start of a stage on its own output directory (one run per output at a time: DVC
    and the retrain flow lock the repository), never on a directory another process writes to.
    """
    removed = 0
    root = Path(root)
    if not root.is_dir():
        return 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            if is_temp_name(name):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    return removed
