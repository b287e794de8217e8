"""Commit outcomes and verify, held by the sentences of docs/protocol.md and docs/api.md that each test names."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from bucketsnap import CorruptSnapshotError, SnapshotStore
from bucketsnap._manifest import generation_name


def test_a_generation_create_that_landed_but_reported_a_conflict_is_a_committed_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """protocol.md, Saving step 5: a throttled create is retried by bucketsnap, and "the retry would find the
    writer's own generation"; step 6: "A change that finds itself already applied, such as a save whose own
    entry is listed, commits nothing new"; guarantee 6: "Once a commit has landed, nothing deletes its objects,
    and the caller is told it is committed"."""
    store = SnapshotStore(str(tmp_path / "run"))
    store.save(0, {"v": 0})
    original = store.storage.create_exclusive
    lost: list[str] = []

    def landed_then_refused(rel: str, data: bytes) -> None:
        original(rel, data)
        if rel.startswith("manifest/0") and not lost:  # the create landed; its retry found it there
            lost.append(rel)
            raise FileExistsError(rel)

    monkeypatch.setattr(store.storage, "create_exclusive", landed_then_refused)
    info = store.save(1, {"v": 1})
    assert lost and info.itr == 1
    monkeypatch.undo()
    fresh = SnapshotStore(store.url)
    assert fresh.itrs() == [0, 1]
    assert fresh.info(1).path == info.path
    assert fresh.verify(1) and fresh.load(1) == {"v": 1}


def test_verify_refuses_an_archive_of_another_size_than_committed_even_without_a_whole_checksum(
    tmp_path: Path,
) -> None:
    """docs/api.md: verify "re-reads every member, checking CRC-32, zstd checksum and sizes"; an entry committed
    before whole-archive checksums (protocol.md: "checksums" is per entry) gets its members checked, and its
    archive's size: bytes appended after the members are no snapshot that was committed."""
    store = SnapshotStore(str(tmp_path / "run"))
    info = store.save(1, {"v": 1})
    generation = store._log.generations()[-1]
    doc: dict[str, Any] = json.loads(store.storage.read(generation_name(generation)))
    for entry in doc["snapshots"]:
        entry.pop("checksums", None)  # as an older bucketsnap committed it
    doc.update(generation=generation + 1, parent=doc.get("id"), id=uuid.uuid4().hex)
    store.storage.create_exclusive(generation_name(generation + 1), json.dumps(doc).encode())
    fresh = SnapshotStore(store.url)
    assert fresh.verify(1).itr == 1
    with open(tmp_path / "run" / info.path, "ab") as f:
        f.write(b"appended by someone else")
    with pytest.raises(CorruptSnapshotError):
        fresh.verify(1)


def test_a_reader_whose_listed_generation_was_pruned_before_its_read_lists_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """protocol.md, Reading: "List manifest/, read the highest generation. If it vanished between the list and
    the read (pruned), list again"."""
    writer = SnapshotStore(str(tmp_path / "run"))
    writer.save(0, {"v": 0})
    reader = SnapshotStore(writer.url)
    stale = reader.storage.list("manifest")  # the reader lists here, and is descheduled ...
    for itr in range(1, 13):  # ... while the writer commits and prunes the generation it listed
        writer.save(itr, {"v": itr})
    assert not set(stale) & set(writer.storage.list("manifest")) - {"pages"}
    original = reader.storage.list
    listings: list[str] = []

    def list_late(rel_dir: str) -> list[str]:
        listings.append(rel_dir)
        if rel_dir == "manifest" and listings.count("manifest") == 1:
            return stale
        return original(rel_dir)

    monkeypatch.setattr(reader.storage, "list", list_late)
    assert reader.itrs() == list(range(13))
    assert listings.count("manifest") >= 2
