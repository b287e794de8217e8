"""docs/protocol.md, "The log": "A reader checks each page against its reference (size, level, first, last, count,
and a level-1 page's itrs) and raises CorruptSnapshotError otherwise, whether it read the page just now or
remembers it from an earlier read".

Each test commits a generation whose page reference lies about one of those fields (as a damaged or hostile
manifest would), and reads an itr under it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import bucketsnap._pages as pages_module
from bucketsnap import CorruptSnapshotError, SnapshotStore
from bucketsnap._manifest import generation_name
from bucketsnap._pages import _runs


def _newest(store: SnapshotStore) -> tuple[int, dict[str, Any]]:
    generation = store._log.generations()[-1]
    return generation, json.loads(store.storage.read(generation_name(generation)))


def _commit_edited(store: SnapshotStore, generation: int, doc: dict[str, Any]) -> None:
    """Create generation ``generation + 1`` holding ``doc`` (an edited copy of ``generation``), built on it."""
    doc = {**doc, "generation": generation + 1, "parent": doc.get("id"), "id": uuid.uuid4().hex}
    store.storage.create_exclusive(generation_name(generation + 1), json.dumps(doc).encode())


def _run_with_a_page(url: str) -> SnapshotStore:
    """Itrs 0, 2, ..., 58: the 24 lowest sealed into one level-1 page, the rest in the tail."""
    store = SnapshotStore(url)
    for itr in range(0, 60, 2):
        store.save(itr, {"v": itr})
    _, doc = _newest(store)
    assert [ref["level"] for ref in doc["pages"]] == [1]
    return store


def test_a_remembered_page_is_checked_against_a_reference_that_lies_about_its_size() -> None:
    store = _run_with_a_page("memory://guarantees-pages/cached-size")
    assert store.info(4).itr == 4  # reads the page, and remembers it
    generation, doc = _newest(store)
    doc["pages"][0]["size"] += 1
    _commit_edited(store, generation, doc)
    with pytest.raises(CorruptSnapshotError):
        SnapshotStore(store.url).info(4)  # read just now
    with pytest.raises(CorruptSnapshotError):
        store.info(4)  # remembered from the earlier read: checked all the same


def test_a_level_1_page_whose_itrs_are_not_its_references_is_refused() -> None:
    store = _run_with_a_page("memory://guarantees-pages/itrs")
    generation, doc = _newest(store)
    ref = doc["pages"][0]
    held = list(range(0, 48, 2))
    lie = [0, 1, *held[2:]]  # same first, last and count; 1 in place of 2
    assert ref["itrs"] == _runs(held) and len(lie) == ref["count"]
    ref["itrs"] = _runs(lie)
    _commit_edited(store, generation, doc)
    with pytest.raises(CorruptSnapshotError):
        SnapshotStore(store.url).info(4)


@pytest.fixture
def small_pages() -> Iterator[None]:
    """Pages of 2 entries and 2 references, so that a few saves build upper levels."""
    saved = pages_module.TAIL, pages_module.FANOUT
    pages_module.TAIL, pages_module.FANOUT = 2, 2
    try:
        yield
    finally:
        pages_module.TAIL, pages_module.FANOUT = saved


def test_an_upper_page_whose_count_is_not_its_references_is_refused(small_pages: None) -> None:
    store = SnapshotStore("memory://guarantees-pages/count")
    for itr in range(12):
        store.save(itr, {"v": itr})
    generation, doc = _newest(store)
    upper = next(ref for ref in doc["pages"] if ref["level"] >= 2)
    upper["count"] += 1
    doc["count"] += 1
    _commit_edited(store, generation, doc)
    with pytest.raises(CorruptSnapshotError):
        SnapshotStore(store.url).info(upper["first"])
