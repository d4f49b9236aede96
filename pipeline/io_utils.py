"""Small I/O helpers shared by the stages."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"
# mkstemp creates files 0600; outputs get the permissions a plain open() would give them
_UMASK = os.umask(0)
os.umask(_UMASK)
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
            if name.endswith(TMP_SUFFIX) and TMP_NAME.match(name):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    return removed
