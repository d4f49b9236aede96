"""Sources: where ingest's input files come from.

Ingest does not walk folders or open paths itself: it asks a :class:`Source` for its entries and
their bytes. A source yields every item it holds exactly once, each with a stable id, so ingest can
account for all of them (an item that cannot be read is an entry with a reason, never skipped), and
a signature that changes when the item's content may have changed, so a rerun reads only new or
changed items. :class:`~pipeline.sources.folder.FolderSource` (a DICOM export on disk) is the only
source today.

Adding a data source (e.g. a PACS) means one class with the methods of :class:`Source`; nothing in
ingest changes. Ids may hold PHI (folder paths often hold names and MRNs): they stay local — ingest
writes only keyed hashes of them (``Pseudonymizer.file_id``) into anything DVC tracks or Prefect shows.
See docs/design.md, "Adding a data source".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Rejection categories a source gives (the part of a reason before the colon; ingest counts by these).
TOO_LARGE = "too_large"
SPECIAL_FILE = "special_file"
UNREADABLE = "unreadable"
SYMLINK = "symlink"
BAD_NAME = "bad_name"
MB = 1024 * 1024


@dataclass(frozen=True)
class Entry:
    """One item of a source.

    Attributes:
        id: stable and unique within the source (a folder: the relative POSIX path). Local only.
        reason: '' for an item to read, else why it is not read (``category: detail``, no values).
        signature: changes whenever the content may have changed (a folder: size, mtime, inode);
            empty when the source cannot tell (the item is then always read).
    """

    id: str
    reason: str = ""
    signature: tuple[int, ...] = ()


class Source(Protocol):
    """What ingest needs from where its files come from. Implementations must be picklable (ingest's
    worker processes read through them)."""

    def check(self) -> None:
        """Raise a one-line :class:`~pipeline.errors.MedtlError` if the source cannot be used at all."""
        ...

    def entries(self, skip: tuple[Path, ...] = ()) -> list[Entry]:
        """Every item, sorted by id, each once; ``skip``: files of the source that are not inputs
        (the labels and lesion sidecars when they sit inside it)."""
        ...

    def read(self, item_id: str, max_bytes: int) -> tuple[bytes | None, str]:
        """The item's bytes, or (None, reason) when it is above ``max_bytes`` or cannot be read."""
        ...

    def display(self, item_id: str) -> str:
        """The id as text that can be written anywhere (still PHI-bearing: local files only)."""
        ...

    def keep(self, item_id: str, target: Path, max_bytes: int) -> bool:
        """Put the raw item at ``target`` (the local quarantine: a hard link where it can); False when
        it is not a regular item or cannot be copied."""
        ...

    def contains(self, path: Path) -> bool:
        """Whether ``path`` lies inside the source (an output there would be read back as input)."""
        ...

    def synthetic_files(self) -> frozenset[str]:
        """Content ids of the items ``medtl synth`` wrote (the only ones the public demo key may
        pseudonymise); empty for a source that holds none."""
        ...
