"""The page cache (docs/protocol.md, "The log"): a page remembered from an earlier read is checked against the
reference it is read through exactly as a page just read is, and readers on several threads share a store whose
cache evicts pages past its bound."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from bucketsnap import CorruptSnapshotError, SnapshotStore
from bucketsnap._manifest import generation_name
from bucketsnap._pages import TAIL, PageStore
from helpers import run_together


def _run(count: int) -> SnapshotStore:
    store = SnapshotStore(f"memory://page-cache/{uuid.uuid4().hex}")
    real = store.save(0, {"step": 0})
    store._log.commit(lambda current: [real] + [replace(real, itr=i) for i in range(1, count)])
    return store


def _rewrite_newest(store: SnapshotStore, change: Any) -> None:
    """Commit, by hand, a generation that is the newest one as ``change`` changes its JSON."""
    log = store._log
    newest = log.generations()[-1]
    doc = json.loads(store._storage.read(generation_name(newest)))
    change(doc)
    doc["generation"] = newest + 1
    store._storage.create_exclusive(generation_name(newest + 1), json.dumps(doc).encode())


def _fewer(doc: dict[str, Any]) -> None:
    """The first page's reference, and the generation's count, one entry short (its newest itr)."""
    ref = doc["pages"][0]
    ref.update(count=ref["count"] - 1, last=ref["last"] - 1, itrs=[ref["itrs"][0], ref["itrs"][1] - 1])
    doc["count"] -= 1


# Each leaves the generation consistent in itself; only the page tells the lie.
LIES = {
    "size": lambda doc: doc["pages"][0].update(size=doc["pages"][0]["size"] + 1),
    "count": _fewer,
    "itrs": lambda doc: doc["pages"][0].update(itrs=[0, 1, 2, doc["pages"][0]["count"] + 1]),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_cached_page_that_its_reference_no_longer_describes_is_refused_as_a_fresh_read_is(lie: str) -> None:
    store = _run(2 * TAIL + 4)  # two level-1 pages, the first holding itrs 0 to TAIL - 1
    assert store.load(1)["step"] == 0  # reads (and caches) the first page
    _rewrite_newest(store, LIES[lie])
    with pytest.raises(CorruptSnapshotError, match=r"manifest page .* run"):
        SnapshotStore(store.url).load(1)  # a fresh reader reads the page and refuses it
    with pytest.raises(CorruptSnapshotError, match=r"manifest page .* run"):
        store.load(1)  # this reader has the page cached: the same check, the same refusal


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter can, so that unguarded shared state shows its races."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_readers_on_many_threads_past_the_cache_bound_read_every_itr(
    monkeypatch: pytest.MonkeyPatch, busy_switching: None
) -> None:
    monkeypatch.setattr(PageStore, "MAX_CACHED", 4)
    store = _run(40 * TAIL)  # 40 level-1 pages and their level-2 pages: ten times the cache
    expected = store.itrs()
    itrs = list(range(0, 40 * TAIL, 7))

    def read(k: int) -> None:
        for _ in range(3):
            for itr in itrs[k::3] + itrs[: k * 5]:
                info = store.info(itr)
                assert info.itr == itr
            assert store.itrs() == expected

    errors = run_together(8, read)
    assert not errors, errors[:3]
    assert len(store._log.pages._cache) <= 4


def test_the_cache_never_holds_more_than_its_bound_under_concurrent_writes_of_pages(busy_switching: None) -> None:
    pages = PageStore(lambda rel: b"", str, "memory://x")
    pages.MAX_CACHED = 16

    def remember(k: int) -> None:
        for i in range(2000):
            pages.remember(f"manifest/pages/{k:04d}{i:08d}-{'0' * 16}.json", (), 0)

    errors = run_together(8, remember)
    assert not errors, errors[:3]
    assert len(pages._cache) <= 16
