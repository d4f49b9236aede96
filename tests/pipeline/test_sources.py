"""The source seam: ingest reads through a Source, so a source that is not a folder plugs in unchanged."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field

import pandas as pd

from pipeline import ingest
from pipeline.sources import TOO_LARGE, Entry
from pipeline.sources.folder import FolderSource
from tests.conftest import TEST_KEY


@dataclass(frozen=True)
class MemorySource:
    """Items held in memory under opaque ids (as a PACS source would hold instances by UID)."""

    items: dict[str, bytes]
    reads: list = field(default_factory=list, compare=False)

    def check(self):
        pass

    def entries(self, skip=()):
        return [Entry(i, "", (len(data), int.from_bytes(hashlib.sha1(data).digest()[:6], "big")))
                for i, data in sorted(self.items.items())]

    def read(self, item_id, max_bytes):
        self.reads.append(item_id)
        data = self.items[item_id]
        return (None, f"{TOO_LARGE}: item above the cap") if len(data) > max_bytes else (data, "")

    def display(self, item_id):
        return item_id

    def keep(self, item_id, target, max_bytes):
        return False

    def contains(self, path):
        return False

    def synthetic_files(self):
        return frozenset()


def test_a_source_that_is_not_a_folder_gives_the_folder_s_result(tmp_path):
    from pipeline import synth

    cohort = tmp_path / "synth"
    synth.run(synth.SynthParams(patients=6, seed=5), cohort)
    labels = tmp_path / "labels.csv"  # keyed by UID: ids of a non-folder source are not paths
    shutil.copy(cohort / "labels.csv", labels)
    folder = FolderSource(cohort)
    entries = [e for e in folder.entries(skip=(cohort / "labels.csv", cohort / "lesions.csv")) if not e.reason]
    items = {f"item-{n:04d}": (cohort / e.id).read_bytes() for n, e in enumerate(entries)}
    for path in (cohort / "labels.csv", cohort / "lesions.csv"):
        path.rename(tmp_path / f"aside-{path.name}")  # the folder run sees the same files as the memory source

    by_folder = ingest.run(ingest.IngestParams(workers=1), cohort, labels, tmp_path / "a", key=TEST_KEY)
    memory = MemorySource(items)
    by_memory = ingest.run(ingest.IngestParams(workers=1), memory, labels, tmp_path / "b", key=TEST_KEY)

    assert by_memory.files_seen == by_folder.files_seen == len(items)
    assert by_memory.ingested == by_folder.ingested > 0 and by_memory.rejected == by_folder.rejected
    a, b = (pd.read_parquet(tmp_path / d / "manifest.parquet") for d in ("a", "b"))
    pd.testing.assert_frame_equal(a, b)  # content-addressed outputs: where bytes came from does not matter

    # unchanged signatures: the rerun reads nothing from the source
    memory.reads.clear()
    again = ingest.run(ingest.IngestParams(workers=1), memory, labels, tmp_path / "b", key=TEST_KEY)
    assert memory.reads == [] and again.run["new_files"] == 0


def test_the_folder_source_accounts_for_every_entry_with_its_signature(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one").write_bytes(b"x" * 10)
    (tmp_path / "two").write_bytes(b"y")
    (tmp_path / "link").symlink_to(tmp_path / "a" / "one")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    found = {e.id: e for e in FolderSource(tmp_path).entries()}
    assert sorted(found) == ["a/one", "dangling", "link", "two"]
    assert found["a/one"].signature[0] == 10 and found["link"].signature == found["a/one"].signature
    assert found["dangling"].reason.startswith("symlink:") and found["dangling"].signature == ()
    data, reason = FolderSource(tmp_path).read("a/one", 5)
    assert data is None and reason.startswith("too_large:")
    assert FolderSource(tmp_path).read("a/one", 10) == (b"x" * 10, "")
