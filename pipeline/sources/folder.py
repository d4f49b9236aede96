"""A DICOM export on disk (a folder tree), as a :class:`~pipeline.sources.Source`.

Every directory entry that is not a directory is accounted for: regular files are read; special
files (FIFO, socket, device) are never opened; symbolic links are read only when they point to a
regular file inside the folder (a dangling link, a loop, a link leaving the folder or pointing to a
directory gets a reason); a name that is not UTF-8 and a directory that cannot be listed get a
reason too. Directories are never followed through links, so the walk ends whatever the tree holds.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import MedtlError
from pipeline.paths import SYNTH_MARKER
from pipeline.sources import BAD_NAME, MB, SPECIAL_FILE, SYMLINK, TOO_LARGE, UNREADABLE, Entry

SIDECAR_NAMES = frozenset({SYNTH_MARKER})  # written by `medtl synth` next to the tree


class SourceError(MedtlError):
    """The source cannot be used at all (e.g. the folder does not exist or cannot be listed)."""


def display_path(relpath: str) -> str:
    """A relative path as text that can be written anywhere: bytes of a non-UTF-8 name as ``\\xNN``."""
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_bad_name(relpath: str) -> bool:
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode keeps undecodable bytes as lone surrogates
        return True
    return False


def _signature(info: os.stat_result) -> tuple[int, ...]:
    return info.st_size, info.st_mtime_ns, info.st_ino


def _link(path: str, root: Path) -> tuple[str, tuple[int, ...]]:
    """('' and the target's signature) for a link to a regular file inside the folder, else (why not, ())."""
    try:
        target = Path(path).resolve(strict=True)
        info = os.stat(path)
    except FileNotFoundError:
        return f"{SYMLINK}: dangling symbolic link (its target does not exist)", ()
    except RuntimeError:
        return f"{SYMLINK}: symbolic link loop", ()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{SYMLINK}: symbolic link loop", ()
        return f"{SYMLINK}: target cannot be read ({exc.strerror})", ()
    if not target.is_relative_to(root):
        return f"{SYMLINK}: symbolic link to a file outside the input folder (not followed: copy the file in)", ()
    if stat.S_ISDIR(info.st_mode):
        return f"{SYMLINK}: symbolic link to a directory (not followed: its files would be seen twice)", ()
    if not stat.S_ISREG(info.st_mode):
        return f"{SPECIAL_FILE}: symbolic link to a FIFO, socket or device", ()
    return "", _signature(info)


@dataclass(frozen=True)
class FolderSource:
    """The files under ``root``; ids are POSIX paths relative to it."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def check(self) -> None:
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: input directory does not exist")

    def entries(self, skip: tuple[Path, ...] = ()) -> list[Entry]:
        """Every entry that is not a directory, sorted by the bytes of its path (see the module docstring).

        ``skip`` and synth's marker (at the top) are left out.
        """
        self.check()
        root = self.root.resolve()
        skip_set = {Path(p).resolve() for p in skip}
        skip_names = {p.name for p in skip_set}
        found: list[Entry] = []

        def visit(folder: str, prefix: str) -> None:
            try:
                with os.scandir(folder) as it:
                    listed = sorted(it, key=lambda e: os.fsencode(e.name))
            except OSError as exc:
                if not prefix:
                    raise SourceError(f"{self.root}: input directory cannot be listed ({exc.strerror})") from None
                found.append(Entry(prefix, f"{UNREADABLE}: directory cannot be listed ({exc.strerror}); "
                                           "its files are not seen"))
                return
            for entry in listed:
                rel = f"{prefix}/{entry.name}" if prefix else entry.name
                signature: tuple[int, ...] = ()
                try:
                    if entry.is_dir(follow_symlinks=False):
                        visit(entry.path, rel)
                        continue
                    if not prefix and entry.name in SIDECAR_NAMES:
                        continue
                    if entry.is_symlink():
                        reason, signature = _link(entry.path, root)
                    elif entry.is_file(follow_symlinks=False):
                        if entry.name in skip_names and Path(entry.path).resolve() in skip_set:
                            continue
                        reason, signature = "", _signature(entry.stat(follow_symlinks=False))
                    else:
                        reason = f"{SPECIAL_FILE}: a FIFO, socket or device, not a file (never opened)"
                except OSError as exc:
                    reason = f"{UNREADABLE}: cannot be examined ({exc.strerror})"
                if _is_bad_name(rel):
                    reason, signature = f"{BAD_NAME}: the path is not valid UTF-8 (rename the file)", ()
                found.append(Entry(rel, reason, signature))

        visit(str(root), "")
        return found

    def read(self, item_id: str, max_bytes: int) -> tuple[bytes | None, str]:
        path = self.root / item_id
        limit = f"ingest.max_file_mb ({max_bytes / MB:g})"
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # links were vetted by the walk
            with os.fdopen(fd, "rb") as fh:
                info = os.fstat(fh.fileno())
                if not stat.S_ISREG(info.st_mode):  # replaced by something else since the walk
                    return None, f"{SPECIAL_FILE}: not a regular file"
                if info.st_size > max_bytes:
                    return None, f"{TOO_LARGE}: file of {info.st_size / MB:.0f} MB, above {limit}"
                data = fh.read(info.st_size + 1)  # read(n) allocates n bytes up front: ask for what is there
                if len(data) > max_bytes:  # grew since fstat
                    return None, f"{TOO_LARGE}: file above {limit}"
                return data, ""
        except PermissionError:
            return None, f"{UNREADABLE}: permission denied"
        except OSError as exc:
            return None, f"{UNREADABLE}: cannot be read ({exc.strerror or type(exc).__name__})"

    def display(self, item_id: str) -> str:
        return display_path(item_id)

    def keep(self, item_id: str, target: Path, max_bytes: int) -> bool:
        source = self.root / item_id
        try:
            info = os.lstat(source)
        except OSError:
            return False
        if not stat.S_ISREG(info.st_mode):
            return False
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)
            return True
        except OSError:
            if info.st_size > max_bytes:
                return False
            try:
                shutil.copy2(source, target)
                return True
            except OSError:
                return False

    def contains(self, path: Path) -> bool:
        return Path(path).resolve().is_relative_to(self.root.resolve())

    def synthetic_files(self) -> frozenset[str]:
        from pipeline import keys

        return keys.synthetic_files(self.root)
