"""The paged list of committed snapshots that a manifest generation carries (manifest version 3).

A generation lists its snapshots as a *tree* so that a commit writes, and a lookup reads, a bounded number of
bytes however many snapshots the run has:

* the newest entries (the *tail*, at most :data:`TAIL` of them) are inline in the generation;
* older entries live in sealed, immutable *pages* under ``manifest/pages/``: a level-1 page holds up to
  about :data:`TAIL` entries, a level-k page (k > 1) holds up to about :data:`FANOUT` references to level
  k-1 pages, and the generation carries inline the references that no page holds yet (at most
  :data:`FANOUT` of levels 1 and 2, any number of level 3).

Every reference names its page, the page's level, the lowest and highest itr under it, how many entries it
covers, the page's size in bytes, whether an entry under it shares objects by content (``refs``), and for a
level-1 page its itrs. Entries are ordered: every itr under a reference of level 3 is below every itr under one
of level 2, below level 1, below the tail; within a level the references ascend. So an itr is found by at most
one page per level (three reads), and absent itrs are told from the level-1 reference's itr list.

A change copies the path to the entry it touches: the page holding it and every page above it are rewritten
under new names (a random token each), and the generation references the new ones; a page the change leaves
half full or less is merged with its neighbour, so that deletes leave no trail of sparse pages. Appending seals
the tail into a page when it is full (and a full inline level into a page of the next level), so the amortised
cost of a commit is constant. Pages are written before the generation that references them; one never
referenced (a commit that lost its race) is an orphan that gc removes. The trade-off: a lookup by itr costs up
to three page reads more than a flat list, and listing every itr reads every page above level 1.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Union

from bucketsnap._info import SnapshotInfo
from bucketsnap.errors import CorruptSnapshotError

__all__ = ["FANOUT", "PAGE_DIR", "TAIL", "MissingPageError", "PageRef", "PageStore", "Tree"]

PAGE_DIR = "manifest/pages"
PAGE_FORMAT = "bucketsnap-manifest-page"
_PAGE_NAME = re.compile(r"\d{12}-[0-9a-f]{16}")
#: Entries inline in a generation before they are sealed into a level-1 page (and a level-1 page's size).
TAIL = 24
#: References inline at levels 1 and 2 before they are sealed into a page of the next level (and its size).
FANOUT = 16
#: The highest level of page; its references are all inline.
TOP = 3
#: A save reuses the chunks of the newest snapshots holding some: until this many are found (the tail's all
#: count), reading at most :data:`REUSE_PAGES` pages, newest first.
REUSE_SNAPSHOTS = 8
REUSE_PAGES = 4

Item = Union[SnapshotInfo, "PageRef"]


@dataclass(frozen=True)
class PageRef:
    """A reference to one sealed page: level 1 holds entries, level k > 1 references to level k-1 pages."""

    path: str
    level: int
    first: int
    last: int
    count: int
    size: int
    shares: bool = False
    itrs: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "page": self.path[len(PAGE_DIR) + 1 : -len(".json")],
            "level": self.level,
            "first": self.first,
            "last": self.last,
            "count": self.count,
            "size": self.size,
        }
        if self.shares:
            doc["shares"] = True
        if self.level == 1:
            doc["itrs"] = _runs(self.itrs)
        return doc

    @classmethod
    def from_json(cls, d: object, where: str) -> PageRef:
        try:
            if not isinstance(d, dict):
                raise TypeError(f"a JSON {type(d).__name__}, not an object")
            name = d["page"]
            if not isinstance(name, str) or not _PAGE_NAME.fullmatch(name):
                raise ValueError(f"bad page name {name!r}")
            path = f"{PAGE_DIR}/{name}.json"
            ref = cls(
                path,
                _int(d["level"]),
                _int(d["first"]),
                _int(d["last"]),
                _int(d["count"]),
                _int(d["size"]),
                bool(d.get("shares", False)),
                _unruns(d.get("itrs", []), _int(d["count"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptSnapshotError(f"manifest {where} has a malformed page reference: {exc}") from exc
        itrs_ok = ref.level != 1 or (len(ref.itrs) == ref.count and list(ref.itrs) == sorted(set(ref.itrs)))
        if not 1 <= ref.level <= TOP or ref.count < 1 or ref.first > ref.last or not itrs_ok:
            raise CorruptSnapshotError(f"manifest {where} has an inconsistent page reference to {ref.path}")
        return ref


class MissingPageError(CorruptSnapshotError):
    """A page a generation references is gone: its generation was pruned and gc removed it (read the newest
    generation again), or the run is damaged (repair it)."""


def _runs(itrs: Sequence[int]) -> list[int]:
    """Ascending itrs as ``[start, stop, start, stop, ...]`` of half-open ranges: a run of consecutive itrs is two
    numbers.

    >>> _runs([1, 2, 3, 7, 9, 10])
    [1, 4, 7, 8, 9, 11]
    """
    out: list[int] = []
    for itr in itrs:
        if out and out[-1] == itr:
            out[-1] = itr + 1
        else:
            out += [itr, itr + 1]
    return out


def _unruns(runs: object, count: int) -> tuple[int, ...]:
    """The itrs of ``[start, stop, ...]`` ranges, checked first (ascending, non-empty, at most ``count`` itrs in
    all) so that a corrupt reference cannot make a reader expand a range of 10**12 itrs."""
    if not isinstance(runs, list) or len(runs) % 2:
        raise ValueError("itrs is not a list of [start, stop) pairs")
    bounds = [_int(b) for b in runs]
    pairs = list(zip(bounds[::2], bounds[1::2], strict=True))
    if any(stop <= start for start, stop in pairs) or any(a[1] > b[0] for a, b in itertools.pairwise(pairs)):
        raise ValueError("itrs ranges are not ascending and non-empty")
    if sum(stop - start for start, stop in pairs) > count:
        raise ValueError(f"itrs ranges hold more than the reference's count ({count})")
    return tuple(i for start, stop in pairs for i in range(start, stop))


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


class PageStore:
    """Reads pages for one run, and remembers the ones read or written (pages never change once written).

    A remembered page is checked against the reference it is read through exactly as a page just read is (a
    reference that does not describe it is a corrupt generation, whatever was cached). Safe to share between
    threads: the cache is guarded by a lock, and evicts its oldest pages past :attr:`MAX_CACHED`.

    Args:
        read: reads a page's bytes by its relative path (FileNotFoundError if missing).
        url_of: the URL of a relative path, for messages.
        base_url: the run's URL, for the entries' URLs.
    """

    MAX_CACHED = 4096

    def __init__(self, read: Callable[[str], bytes], url_of: Callable[[str], str], base_url: str) -> None:
        self._read = read
        self._url_of = url_of
        self.base_url = base_url
        self._cache: OrderedDict[str, tuple[tuple[Item, ...], int]] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, ref: PageRef) -> tuple[Item, ...]:
        """The items of page ``ref``; MissingPageError if it is gone, CorruptSnapshotError if it is not it."""
        with self._lock:
            cached = self._cache.get(ref.path)
        if cached is not None:
            items, size = cached
        else:
            try:
                data = self._read(ref.path)
            except FileNotFoundError as exc:
                raise MissingPageError(
                    f"manifest page {self._url_of(ref.path)} is missing; if it stays missing, run "
                    "SnapshotStore.repair() (`bucketsnap repair`) to commit a generation rebuilt from the archives"
                ) from exc
            items, size = self._parse(ref, data), len(data)
        self._check(ref, items, size)
        if cached is None:
            self.remember(ref.path, items, size)
        return items

    def remember(self, path: str, items: tuple[Item, ...], size: int) -> None:
        """Remember page ``path`` of ``size`` bytes, holding ``items``."""
        with self._lock:
            self._cache[path] = (items, size)
            while len(self._cache) > self.MAX_CACHED:
                self._cache.popitem(last=False)

    def _parse(self, ref: PageRef, data: bytes) -> tuple[Item, ...]:
        where = self._url_of(ref.path)
        if len(data) != ref.size:
            raise self._size_error(ref, len(data))
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != PAGE_FORMAT or doc.get("level") != ref.level:
                raise ValueError("not a manifest page of the level its reference says")
            raw = doc["items"]
            if not isinstance(raw, list):
                raise ValueError("no item list")
        except (ValueError, KeyError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptSnapshotError(
                f"manifest page {where} is not valid ({exc}); run SnapshotStore.repair()"
            ) from exc
        if ref.level == 1:
            return tuple(SnapshotInfo.from_json(e, base_url=self.base_url) for e in raw)
        return tuple(PageRef.from_json(r, where) for r in raw)

    def _size_error(self, ref: PageRef, size: int) -> CorruptSnapshotError:
        return CorruptSnapshotError(
            f"manifest page {self._url_of(ref.path)} has {size} bytes, its generation says {ref.size}; run "
            "SnapshotStore.repair() (`bucketsnap repair`) to commit a generation rebuilt from the archives"
        )

    def _check(self, ref: PageRef, items: tuple[Item, ...], size: int) -> None:
        """Raise CorruptSnapshotError unless page ``ref`` of ``size`` bytes, holding ``items``, is what ``ref``
        says: its size, level, span, count, order and (level 1) its itrs."""
        where = self._url_of(ref.path)
        if size != ref.size:
            raise self._size_error(ref, size)
        if not items or _span(items) != (ref.first, ref.last) or _count(items) != ref.count or not _ascending(items):
            raise CorruptSnapshotError(f"manifest page {where} does not hold what its reference says; run repair()")
        if ref.level == 1:
            ok = all(isinstance(i, SnapshotInfo) for i in items) and tuple(_lo(i) for i in items) == ref.itrs
        else:
            ok = all(isinstance(i, PageRef) and i.level == ref.level - 1 for i in items)
        if not ok:
            raise CorruptSnapshotError(
                f"manifest page {where} holds other itrs or levels than its reference says; run repair()"
            )


def _lo(item: Item) -> int:
    return item.first if isinstance(item, PageRef) else item.itr


def _hi(item: Item) -> int:
    return item.last if isinstance(item, PageRef) else item.itr


def _span(items: Sequence[Item]) -> tuple[int, int]:
    return _lo(items[0]), _hi(items[-1])


def _count(items: Sequence[Item]) -> int:
    return sum(i.count if isinstance(i, PageRef) else 1 for i in items)


def _ascending(items: Sequence[Item]) -> bool:
    return all(_hi(a) < _lo(b) for a, b in itertools.pairwise(items))


def _shares(items: Sequence[Item]) -> bool:
    return any(i.shares if isinstance(i, PageRef) else bool(i.refs) for i in items)


@dataclass(frozen=True)
class Tree:
    """The committed snapshots of one generation: inline tail and references, pages read through ``pages``.

    ``levels[k]`` holds the inline references of level k + 1. ``pending`` are the pages this tree references
    that are not stored yet: the commit writes them before its generation.
    """

    pages: PageStore | None = field(default=None, compare=False, repr=False)
    tail: tuple[SnapshotInfo, ...] = ()
    levels: tuple[tuple[PageRef, ...], ...] = ((), (), ())
    pending: Mapping[str, tuple[bytes, tuple[Item, ...]]] = field(default_factory=dict, compare=False, repr=False)
    _memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # -- reading -------------------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self.tail) + sum(r.count for refs in self.levels for r in refs)

    def _load(self, ref: PageRef) -> tuple[Item, ...]:
        if ref.path in self.pending:  # written by this change, not stored yet
            return self.pending[ref.path][1]
        if self.pages is None:
            raise CorruptSnapshotError(f"no page store to read {ref.path}")
        return self.pages.load(ref)

    def _route(self, itr: int) -> int | None:
        """The inline level (index into ``levels``) whose references own ``itr``; None: the tail."""
        for k in reversed(range(len(self.levels))):
            refs = self.levels[k]
            if refs and itr <= refs[-1].last:
                return k
        return None

    def find(self, itr: int) -> SnapshotInfo | None:
        k = self._route(itr)
        if k is None:
            i = bisect.bisect_left([s.itr for s in self.tail], itr)
            return self.tail[i] if i < len(self.tail) and self.tail[i].itr == itr else None
        items: Sequence[Item] = self.levels[k]
        while True:
            i = bisect.bisect_left([_hi(x) for x in items], itr)
            if i == len(items):
                return None
            item = items[i]
            if isinstance(item, SnapshotInfo):
                return item if item.itr == itr else None
            if itr < item.first or (item.level == 1 and itr not in item.itrs):
                return None
            items = self._load(item)

    def _edge(self, last: bool) -> SnapshotInfo | None:
        groups: list[Sequence[Item]] = [refs for refs in reversed(self.levels) if refs]
        if self.tail:
            groups.append(self.tail)
        if not groups:
            return None
        item = groups[-1][-1] if last else groups[0][0]
        while isinstance(item, PageRef):
            children = self._load(item)
            item = children[-1] if last else children[0]
        return item

    def first(self) -> SnapshotInfo | None:
        return self._edge(last=False)

    def last(self) -> SnapshotInfo | None:
        return self._edge(last=True)

    def _expand(self, items: Sequence[Item], stop: int) -> Iterator[Item]:
        """``items`` with every reference above level ``stop`` replaced by its page's items, recursively."""
        for item in items:
            if isinstance(item, PageRef) and item.level > stop:
                yield from self._expand(self._load(item), stop)
            else:
                yield item

    def _inline(self) -> list[Item]:
        return [*(r for refs in reversed(self.levels) for r in refs), *self.tail]

    def all(self) -> tuple[SnapshotInfo, ...]:
        """Every entry, ascending by itr (reads every page; remembered)."""
        if "all" not in self._memo:
            self._memo["all"] = tuple(i for i in self._expand(self._inline(), 0) if isinstance(i, SnapshotInfo))
        return self._memo["all"]  # type: ignore[no-any-return]

    def itrs(self) -> list[int]:
        """Every itr, ascending: reads the pages above level 1 only."""
        out: list[int] = []
        for item in self._expand(self._inline(), 1):
            out.extend(item.itrs if isinstance(item, PageRef) else (item.itr,))
        return out

    def page_paths(self) -> set[str]:
        """Every page this tree references (reads the pages above level 1)."""
        return {item.path for item in self._walk_refs(self._inline())}

    def _walk_refs(self, items: Sequence[Item]) -> Iterator[PageRef]:
        for item in items:
            if isinstance(item, PageRef):
                yield item
                if item.level > 1:
                    yield from self._walk_refs(self._load(item))

    def referenced(self) -> frozenset[str]:
        """Every object some snapshot needs (reads every page; remembered)."""
        if "referenced" not in self._memo:
            self._memo["referenced"] = frozenset().union(*(s.objects() for s in self.all()))
        return self._memo["referenced"]  # type: ignore[no-any-return]

    def shared(self) -> frozenset[str]:
        """The objects shared by content (``refs``: replay-buffer chunks) of the newest snapshots that hold some,
        which a save may reuse: the tail's, then, while fewer than :data:`REUSE_SNAPSHOTS` snapshots with refs are
        found, those of the pages marked ``shares``, newest first, reading at most :data:`REUSE_PAGES` pages (so a
        save's cost does not grow with the run; a chunk only older snapshots hold is written again)."""
        out: set[str] = set()
        found = 0
        reads = REUSE_PAGES

        def visit(items: Sequence[Item]) -> None:
            nonlocal found, reads
            for item in reversed(items):
                if isinstance(item, SnapshotInfo):
                    if item.refs:
                        out.update(item.refs)
                        found += 1
                elif item.shares and reads > 0 and found < REUSE_SNAPSHOTS:
                    reads -= 1
                    visit(self._load(item))

        visit(self._inline())
        return frozenset(out)

    # -- changing ------------------------------------------------------------------------------------------

    def put(self, info: SnapshotInfo) -> Tree:
        """This tree with ``info`` added, or replacing the entry of the same itr."""

        def change(entries: list[SnapshotInfo]) -> list[SnapshotInfo]:
            kept = [s for s in entries if s.itr != info.itr]
            bisect.insort(kept, info, key=lambda s: s.itr)
            return kept

        return self._change(info.itr, change)

    def remove(self, itr: int) -> Tree:
        """This tree without the entry of ``itr`` (unchanged if there is none)."""
        if self.find(itr) is None:
            return self
        return self._change(itr, lambda entries: [s for s in entries if s.itr != itr])

    def with_entries(self, entries: Sequence[SnapshotInfo]) -> Tree:
        """This tree changed to list exactly ``entries``: only the pages holding a difference are rewritten."""
        new = {s.itr: s for s in entries}
        old = {s.itr: s for s in self.all()}
        tree = self
        for itr in old.keys() - new.keys():
            tree = tree.remove(itr)
        for itr, info in sorted(new.items()):
            if old.get(itr) != info:
                tree = tree.put(info)
        return tree

    def _change(self, itr: int, change: Callable[[list[SnapshotInfo]], list[SnapshotInfo]]) -> Tree:
        pending = dict(self.pending)
        k = self._route(itr)
        if k is None:
            tree = replace(self, tail=tuple(change(list(self.tail))), pending=pending, _memo={})
        else:
            levels = list(self.levels)
            levels[k] = self._rewrite(self.levels[k], itr, change, pending)
            tree = replace(self, levels=tuple(levels), pending=pending, _memo={})
        return tree.sealed()

    def _rewrite(
        self,
        refs: tuple[PageRef, ...],
        itr: int,
        change: Callable[[list[SnapshotInfo]], list[SnapshotInfo]],
        pending: dict[str, tuple[bytes, tuple[Item, ...]]],
    ) -> tuple[PageRef, ...]:
        """``refs`` with the page owning ``itr`` (and the pages under it) rewritten by ``change``."""
        i = min(bisect.bisect_left([r.last for r in refs], itr), len(refs) - 1)
        ref = refs[i]
        children = self._load(ref)
        if ref.level == 1:
            new_children: Sequence[Item] = change([c for c in children if isinstance(c, SnapshotInfo)])
        else:
            sub = tuple(c for c in children if isinstance(c, PageRef))
            new_children = self._rewrite(sub, itr, change, pending)
        cap = TAIL if ref.level == 1 else FANOUT
        lo, hi = i, i + 1
        if 0 < len(new_children) <= cap // 2 and len(refs) > 1:
            # Left with half a page or less: merged with a neighbour (split again below if the two hold more than
            # two pages), so that deletes and retention do not leave a trail of near-empty pages.
            j = i + 1 if i + 1 < len(refs) else i - 1
            neighbour = self._load(refs[j])
            new_children = (*neighbour, *new_children) if j < i else (*new_children, *neighbour)
            lo, hi = min(i, j), max(i, j) + 1
        parts = [new_children] if len(new_children) <= 2 * cap else [new_children[:cap], new_children[cap:]]
        return (*refs[:lo], *(self._seal(p, ref.level, pending) for p in parts if p), *refs[hi:])

    def _seal(self, items: Sequence[Item], level: int, pending: dict[str, tuple[bytes, tuple[Item, ...]]]) -> PageRef:
        """A new page of ``items`` at ``level``, added to ``pending``."""
        first, last = _span(items)
        path = f"{PAGE_DIR}/{first:012d}-{uuid.uuid4().hex[:16]}.json"
        doc = {
            "format": PAGE_FORMAT,
            "version": 3,
            "level": level,
            "items": [i.to_json() for i in items],
        }
        data = json.dumps(doc, separators=(",", ":")).encode()
        pending[path] = (data, tuple(items))
        if self.pages is not None:
            self.pages.remember(path, tuple(items), len(data))
        itrs = tuple(i.itr for i in items if isinstance(i, SnapshotInfo)) if level == 1 else ()
        return PageRef(path, level, first, last, _count(items), len(data), _shares(items), itrs)

    def sealed(self) -> Tree:
        """This tree with a full tail, and full inline levels below the top, sealed into pages (oldest first)."""
        if len(self.tail) < TAIL and all(len(refs) < FANOUT for refs in self.levels[:-1]):
            return self
        pending = dict(self.pending)
        tail = list(self.tail)
        levels = [list(refs) for refs in self.levels]
        while len(tail) >= TAIL:
            levels[0].append(self._seal(tail[:TAIL], 1, pending))
            del tail[:TAIL]
        for k in range(len(levels) - 1):
            while len(levels[k]) >= FANOUT:
                levels[k + 1].append(self._seal(levels[k][:FANOUT], k + 2, pending))
                del levels[k][:FANOUT]
        return replace(self, tail=tuple(tail), levels=tuple(tuple(r) for r in levels), pending=pending, _memo={})

    def written(self) -> dict[str, bytes]:
        """The pending pages this tree still references (a page rewritten twice in one change is dropped)."""
        if not self.pending:
            return {}
        out: dict[str, bytes] = {}
        stack = [r for refs in self.levels for r in refs if r.path in self.pending]
        while stack:
            ref = stack.pop()
            out[ref.path] = self.pending[ref.path][0]
            if ref.level > 1:
                stack.extend(c for c in self._load(ref) if isinstance(c, PageRef) and c.path in self.pending)
        return out

    def committed(self) -> Tree:
        """This tree once its pages are written."""
        return replace(self, pending={})

    # -- the generation's JSON -----------------------------------------------------------------------------

    def refs_json(self) -> list[dict[str, Any]]:
        return [r.to_json() for refs in reversed(self.levels) for r in refs]

    @classmethod
    def from_json(cls, entries: list[SnapshotInfo], refs: list[object], pages: PageStore | None, where: str) -> Tree:
        """The tree of a generation: its inline entries (the tail) and page references, checked for order."""
        parsed = [PageRef.from_json(r, where) for r in refs]
        levels: list[list[PageRef]] = [[] for _ in range(TOP)]
        previous = TOP
        for ref in parsed:
            if ref.level > previous:
                raise CorruptSnapshotError(f"manifest {where} lists its page references out of order")
            previous = ref.level
            levels[ref.level - 1].append(ref)
        items: list[Item] = [*parsed, *entries]
        if not _ascending(items):
            raise CorruptSnapshotError(f"manifest {where} lists an itr twice or out of order")
        return cls(pages, tuple(entries), tuple(tuple(r) for r in levels))
