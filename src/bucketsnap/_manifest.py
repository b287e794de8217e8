"""The commit protocol: which snapshots of a run are committed, as a log of numbered manifest generations.

A run's root holds::

    snapshots/<itr, 12 digits>-<token>.zip      immutable archives, under names no two writers share
    snapshots/<itr>-<token>-rank<r>.zip         rank r's archive of a distributed save
    manifest/<generation, 12 digits>.json       each generation: the committed snapshots (newest inline)
    manifest/pages/<first itr>-<token>.json     immutable pages of older entries (:mod:`bucketsnap._pages`)

Every save draws a random token (:func:`new_token`) and names what it writes after it (:func:`archive_path`;
:func:`rank_token` for the chunks of one rank of a distributed save); this module is the one place that
knows those names, and how a reader names a snapshot (:func:`parse_which`).

A save first writes its archive (invisible to readers: nothing references it yet), then commits by creating
generation N+1, the previous list plus its entry, with an *exclusive* create. If N+1 already exists another
writer committed first: re-read, re-apply the change to the newer list, and try N+2. The exclusive create is
the single instant at which a snapshot becomes committed, which gives the four properties we need:

* a crash at any instant leaves every committed snapshot intact (nothing committed is ever rewritten; a crash
  leaves at most an unreferenced archive, an orphan that :meth:`SnapshotStore.gc` removes);
* readers never see an uncommitted snapshot (they only follow the manifest);
* two writers never lose each other's commits (each generation is created exactly once, and each writer
  re-applies its change on top of the newest one);
* ``last``/``first``/``itr`` cost at most five requests (list ``manifest/``, read the newest, at most one page
  per level) however many snapshots the run has, because writers prune generations older than the newest
  :data:`KEEP_GENERATIONS` and a generation carries only a bounded tail and page references.

The trade-off, as in Delta Lake's log (small commits plus checkpoints): a commit writes the tail and, amortised,
about one entry's worth of pages, so its cost stays flat as the run grows; in exchange an old itr costs up to
three page reads, and a listing of every entry reads every page. A reader needs no listing of ``snapshots/``.
Backends without an atomic exclusive create weaken only the third property (see
:mod:`bucketsnap._storage`).
"""

from __future__ import annotations

import json
import logging
import operator
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import SupportsIndex, TypeVar

from bucketsnap._archive import FORMAT_VERSION
from bucketsnap._info import SnapshotInfo
from bucketsnap._pages import MissingPageError, PageStore, Tree
from bucketsnap._storage import Storage
from bucketsnap.errors import (
    BucketsnapError,
    CommitConflictError,
    CorruptSnapshotError,
    SnapshotNotFoundError,
    StorageError,
)

__all__ = [
    "KEEP_GENERATIONS",
    "MANIFEST_DIR",
    "SNAPSHOT_DIR",
    "Manifest",
    "ManifestLog",
    "Sweep",
    "Which",
    "archive_path",
    "new_token",
    "parse_which",
    "rank_token",
    "swept",
]

logger = logging.getLogger("bucketsnap")

MANIFEST_DIR = "manifest"
SNAPSHOT_DIR = "snapshots"
MANIFEST_FORMAT = "bucketsnap-manifest"
MANIFEST_VERSION = 3
#: Versions this bucketsnap reads; versions 1 (no gc state) and 2 (every snapshot inline) are upgraded by the
#: next commit.
READABLE_VERSIONS = (1, 2, 3)
#: Sweeps whose deletions every generation still records (gc sweeps, and the deletions of ``delete`` and
#: overwrites): a writer whose save spans more sweeps than this cannot tell whether its objects were deleted, and
#: fails instead of committing.
SWEEP_HISTORY = 16
#: Generations kept behind the newest; a reader that lists, then reads a generation pruned in between, retries.
KEEP_GENERATIONS = 8
MAX_COMMIT_ATTEMPTS = 200
_GENERATION = re.compile(r"^(\d{12})\.json$")

Which = int | str
T = TypeVar("T")


def parse_which(which: object, *, digits: bool = False, name: str = "which") -> Which:
    """``which`` as a snapshot selector: ``"last"``, ``"first"`` or an int itr.

    Integers (numpy's included, ``bool`` excluded) must be non-negative, as every saved itr is. With ``digits``, a
    string of ASCII digits names that itr too (``"12"``, as garage's ``load`` and the CLI accept it).

    >>> parse_which("last"), parse_which(12), parse_which("12", digits=True)
    ('last', 12, 12)

    Raises:
        ValueError: ``which`` is none of those (``name`` is the argument's name in the message).
    """
    if isinstance(which, str):
        if which in ("last", "first"):
            return which
        if digits and which.isascii() and which.isdecimal():
            return int(which)
    elif isinstance(which, SupportsIndex) and not isinstance(which, bool):
        itr = operator.index(which)
        if itr >= 0:
            return itr
    text = " (or a string of its digits)" if digits else ""
    raise ValueError(f"{name} must be 'last' or 'first' or a non-negative int itr{text}, not {which!r}")


def new_token() -> str:
    """A random token unique to one save: part of the name of every object the save writes (16 hex digits)."""
    return uuid.uuid4().hex[:16]


def archive_path(itr: int, token: str, rank: int | None = None) -> str:
    """The archive of the save ``token`` of ``itr``; ``rank``: that rank's archive of a distributed save.

    >>> archive_path(7, "0123456789abcdef"), archive_path(7, "0123456789abcdef", rank=1)
    ('snapshots/000000000007-0123456789abcdef.zip', 'snapshots/000000000007-0123456789abcdef-rank1.zip')
    """
    suffix = "" if rank is None else f"-rank{rank}"
    return f"{SNAPSHOT_DIR}/{itr:012d}-{token}{suffix}.zip"


def rank_token(token: str, rank: int) -> str:
    """The token that names the other objects (replay-buffer chunks) rank ``rank`` of the save ``token`` writes."""
    return f"{token}{rank:04x}"


@dataclass(frozen=True)
class Sweep:
    """One gc sweep: the objects it deletes, once it has committed the generation recording them."""

    epoch: int
    deleting: frozenset[str]


@dataclass(frozen=True)
class Manifest:
    """One generation of the log: the committed snapshots, ascending by itr, as a :class:`~bucketsnap._pages.Tree`
    whose older entries are read from pages only when a lookup needs them."""

    generation: int
    tree: Tree = field(default_factory=Tree)
    #: When the generation was committed (None for generation 0 and for generations that do not say).
    written: datetime | None = None
    #: A random id of this generation, and the id of the generation it was built on ("" if none or unknown):
    #: a writer tells a generation built on its commit from one built on a pruned predecessor of the same number.
    token: str = ""
    parent: str = ""
    #: Objects gc has condemned (relative path -> when, in seconds since the epoch on gc's clock): no snapshot
    #: of this generation needs them, and a later sweep deletes those that stay condemned for ``min_age``.
    condemned: Mapping[str, float] = field(default_factory=dict)
    #: The number of the newest sweep (0: none yet), and what the newest :data:`SWEEP_HISTORY` sweeps delete.
    sweep: int = 0
    sweeps: tuple[Sweep, ...] = ()
    #: Not a generation that was read: the newest one did not parse (``commit(..., over_corrupt=True)``).
    unreadable: bool = False

    @property
    def snapshots(self) -> tuple[SnapshotInfo, ...]:
        """Every committed snapshot, ascending by itr (reads every page of the generation)."""
        return self.tree.all()

    def itrs(self) -> list[int]:
        return self.tree.itrs()

    def find(self, itr: int) -> SnapshotInfo | None:
        return self.tree.find(itr)

    def resolve(self, which: Which, url: str) -> SnapshotInfo:
        """The snapshot ``which`` names: ``"last"``, ``"first"`` or an int itr (see :func:`parse_which`)."""
        which = parse_which(which)
        if not self.tree.count:
            raise SnapshotNotFoundError(
                f"no committed snapshot at {url}: the run is empty. Check the URL, or save one first."
            )
        if which == "last":
            found = self.tree.last()
        elif which == "first":
            found = self.tree.first()
        else:
            found = self.find(int(which))
        if found is None:
            count = self.tree.count
            if count <= 10:
                shown = ", ".join(map(str, self.itrs()))
            else:
                first, last = self.tree.first(), self.tree.last()
                shown = f"{first.itr if first else '?'} to {last.itr if last else '?'} ({count} in all)"
            raise SnapshotNotFoundError(f"no snapshot with itr {which} at {url}; committed itrs: {shown}")
        if found.format_version != FORMAT_VERSION:
            raise CorruptSnapshotError(
                f"snapshot itr {found.itr} at {found.url} has archive format version {found.format_version!r}; "
                f"this bucketsnap reads format version {FORMAT_VERSION}: upgrade bucketsnap to read it"
            )
        return found

    def referenced(self) -> frozenset[str]:
        """Every object some snapshot of this generation needs (reads every page)."""
        return self.tree.referenced()

    def shared(self) -> frozenset[str]:
        """Every object shared by content (replay-buffer chunks) that some snapshot of this generation needs."""
        return self.tree.shared()

    def with_snapshots(self, snapshots: Iterable[SnapshotInfo]) -> Manifest:
        """This generation's successor listing ``snapshots``: objects they need are no longer condemned.

        Only the pages holding a difference are rewritten."""
        ordered = sorted(snapshots, key=lambda s: s.itr)
        needed = set().union(*(s.objects() for s in ordered))
        condemned = {rel: t for rel, t in self.condemned.items() if rel not in needed}
        return replace(self, tree=self.tree.with_entries(ordered), condemned=condemned)

    def with_entry(self, info: SnapshotInfo) -> Manifest:
        """This generation's successor with ``info`` added (or replacing its itr's entry), un-condemning its objects.

        A condemned object is needed by no snapshot (gc condemns only those, and a commit that needs one
        removes it), so only the new entry's objects can leave ``condemned``.
        """
        needed = info.objects()
        condemned = {rel: t for rel, t in self.condemned.items() if rel not in needed}
        return replace(self, tree=self.tree.put(info), condemned=condemned)

    def without(self, itr: int) -> Manifest:
        """This generation's successor without snapshot ``itr``."""
        return replace(self, tree=self.tree.remove(itr))

    def with_sweep(self, deleting: Iterable[str]) -> Manifest:
        """This generation recording one more sweep, of ``deleting`` (unchanged if there is nothing to delete).

        Every deletion of an object that a snapshot may have needed goes through a sweep, so that a save that
        found the object needed sees the deletion in the log (:func:`swept`).
        """
        doomed = frozenset(deleting)
        if not doomed:
            return self
        sweep = Sweep(self.sweep + 1, doomed)
        condemned = {rel: t for rel, t in self.condemned.items() if rel not in doomed}
        return replace(self, condemned=condemned, sweep=sweep.epoch, sweeps=(*self.sweeps, sweep)[-SWEEP_HISTORY:])

    def to_json(self) -> bytes:
        gc: dict[str, object] = {}
        if self.condemned:
            gc["condemned"] = dict(sorted(self.condemned.items()))
        if self.sweep:
            gc["sweep"] = self.sweep
            gc["sweeps"] = [{"epoch": s.epoch, "deleting": sorted(s.deleting)} for s in self.sweeps]
        refs = self.tree.refs_json()
        doc = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "generation": self.generation,
            "written": datetime.now(timezone.utc).isoformat(),
            "count": self.tree.count,
            "snapshots": [s.to_json() for s in self.tree.tail],
            **({"pages": refs} if refs else {}),
            **({"id": self.token, "parent": self.parent} if self.token else {}),
            **({"gc": gc} if gc else {}),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(
        cls, data: bytes, *, generation: int, base_url: str, where: str, pages: PageStore | None = None
    ) -> Manifest:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptSnapshotError(
                f"manifest {where} is not valid JSON ({exc}); run `bucketsnap repair` or SnapshotStore.repair() "
                "to commit a new generation rebuilt from the intact snapshots"
            ) from exc
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise CorruptSnapshotError(f"{where} is not a bucketsnap manifest; run SnapshotStore.repair()")
        version = doc.get("version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise CorruptSnapshotError(
                f"manifest {where} has version {version!r}, this bucketsnap reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; upgrade bucketsnap"
            )
        if doc.get("generation") != generation:
            raise CorruptSnapshotError(f"manifest {where} says generation {doc.get('generation')!r}")
        entries = doc.get("snapshots")
        refs = doc.get("pages", []) if version >= 3 else []
        if not isinstance(entries, list) or not isinstance(refs, list):
            raise CorruptSnapshotError(f"manifest {where} has no snapshot list")
        snapshots = sorted((SnapshotInfo.from_json(e, base_url=base_url) for e in entries), key=lambda s: s.itr)
        if len({s.itr for s in snapshots}) != len(snapshots):
            raise CorruptSnapshotError(f"manifest {where} lists an itr twice")
        # Versions 1 and 2 list every snapshot inline: the tree's tail, sealed into pages by the next commit.
        tree = Tree.from_json(snapshots, refs, pages, where)
        if version >= 3 and doc.get("count") != tree.count:
            raise CorruptSnapshotError(
                f"manifest {where} says it holds {doc.get('count')!r} snapshots, not {tree.count}"
            )
        token, parent = doc.get("id", ""), doc.get("parent", "")
        condemned, sweep, sweeps = _gc_state(doc.get("gc", {}), where)
        return cls(
            generation,
            tree,
            _timestamp(doc.get("written")),
            token=token if isinstance(token, str) else "",
            parent=parent if isinstance(parent, str) else "",
            condemned=condemned,
            sweep=sweep,
            sweeps=sweeps,
        )


def _gc_state(gc: object, where: str) -> tuple[dict[str, float], int, tuple[Sweep, ...]]:
    """A generation's gc record: condemned objects, the newest sweep's number, and recent sweeps."""
    try:
        if not isinstance(gc, dict):
            raise TypeError(f"a JSON {type(gc).__name__}, not an object")
        condemned = {_object_name(rel): float(t) for rel, t in dict(gc.get("condemned", {})).items()}
        sweep = gc.get("sweep", 0)
        if not isinstance(sweep, int) or isinstance(sweep, bool) or sweep < 0:
            raise ValueError(f"bad sweep number {sweep!r}")
        sweeps = tuple(
            Sweep(int(s["epoch"]), frozenset(_object_name(rel) for rel in s["deleting"])) for s in gc.get("sweeps", [])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptSnapshotError(f"manifest {where} has a malformed gc record: {exc}") from exc
    return condemned, sweep, sweeps


def _object_name(rel: object) -> str:
    if not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/") or "://" in rel:
        raise ValueError(f"bad object path {rel!r}")
    return rel


def swept(base: Manifest, current: Manifest, objects: Iterable[str]) -> set[str]:
    """Of ``objects``, which a writer stored or found referenced after it read ``base``, those that a gc sweep
    committed since may have deleted: a commit on top of ``current`` must not reference them.

    A sweep deletes only objects no snapshot of its generation needs, so an object still referenced by
    ``current`` is safe. Objects a writer stores have names no one else uses, and objects it reuses were
    referenced by ``base``, so no sweep up to ``base.sweep`` deletes them: only sweeps after it can. Their
    deletions are recorded in :attr:`Manifest.sweeps`; if one of them is no longer recorded, every object not
    referenced by ``current`` may be gone.
    """
    if current.sweep == base.sweep:  # no sweep since base: nothing to check (and no page to read)
        return set()
    unreferenced = set(objects) - current.referenced()
    if not unreferenced:
        return set()
    recorded = {s.epoch: s.deleting for s in current.sweeps}
    gone: set[str] = set()
    for epoch in range(base.sweep + 1, current.sweep + 1):
        if epoch not in recorded:
            return unreferenced
        gone |= unreferenced & recorded[epoch]
    return gone if current.sweep > base.sweep else unreferenced


def check_not_swept(base: Manifest, current: Manifest, objects: Iterable[str], url: str) -> None:
    """Raise StorageError if a gc sweep since ``base`` may have deleted one of ``objects`` (see :func:`swept`)."""
    gone = swept(base, current, objects)
    if gone:
        first = sorted(gone)[0]
        raise StorageError(
            f"not committed to {url}: gc deleted or may have deleted {len(gone)} object(s) this save wrote or "
            f"reused, such as {first}, while the save was running ({current.sweep - base.sweep} gc sweep(s) since it "
            "started; a process paused for longer than gc's min_age, or gc with min_age=0 beside a running save). "
            "Nothing was committed and every committed snapshot is intact: save again."
        )


def _timestamp(value: object) -> datetime | None:
    try:
        written = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return written if written.tzinfo else written.replace(tzinfo=timezone.utc)


def generation_name(generation: int) -> str:
    return f"{MANIFEST_DIR}/{generation:012d}.json"


class ManifestLog:
    """Reads the newest manifest generation and commits new ones; counts the conflicts it retried."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.conflicts = 0
        self.pages = PageStore(lambda rel: self.storage.read(rel), storage.url_of, storage.url)

    def generations(self) -> list[int]:
        """The generations present, ascending."""
        found = (_GENERATION.match(n) for n in self.storage.list(MANIFEST_DIR))
        return sorted(int(m.group(1)) for m in found if m)

    def read_generation(self, generation: int) -> Manifest:
        rel = generation_name(generation)
        data = self.storage.read(rel)
        return Manifest.from_json(
            data, generation=generation, base_url=self.storage.url, where=self.storage.url_of(rel), pages=self.pages
        )

    def read(self) -> Manifest:
        """The newest generation (generation 0, empty, for a new run)."""
        for _ in range(10):
            generations = self.generations()
            if not generations:
                return Manifest(0, Tree(self.pages))
            try:
                try:
                    return self.read_generation(generations[-1])
                except CorruptSnapshotError as exc:
                    # A generation is written once and never changes, so a torn or short read heals on a
                    # second read; a generation that is really corrupt fails again and is reported.
                    logger.debug("re-reading manifest generation %d: %s", generations[-1], exc)
                    return self.read_generation(generations[-1])
            except FileNotFoundError:
                continue  # pruned between the listing and the read: list again
        raise BucketsnapError(f"the manifest at {self.storage.url} kept changing while being read; retry")

    def lookup(self, look: Callable[[Manifest], T]) -> T:
        """``look(newest generation)``, read again if a page it reads is gone (its generation was pruned and gc
        removed the page: a newer generation has the run's current pages)."""
        for _ in range(10):
            manifest = self.read()
            try:
                return look(manifest)
            except MissingPageError:
                if manifest.generation in self.generations():
                    raise  # its generation is still there: the page was lost, not replaced
        raise BucketsnapError(f"the manifest at {self.storage.url} kept changing while being read; retry")

    def commit(self, change: Callable[[Manifest], list[SnapshotInfo]], *, over_corrupt: bool = False) -> Manifest:
        """Create the next generation listing ``change(newest)``, retrying on top of concurrent commits.

        ``change`` is called again with the newer manifest after each conflict, and may raise to give up.
        The gc record is carried over, less the condemned objects the new list needs.
        With ``over_corrupt`` (repair), a newest generation that does not parse is passed as an empty list.
        """
        return self.commit_state(lambda current: current.with_snapshots(change(current)), over_corrupt=over_corrupt)

    def commit_state(self, change: Callable[[Manifest], Manifest], *, over_corrupt: bool = False) -> Manifest:
        """As :meth:`commit`, with ``change`` returning the whole successor (snapshots and gc record)."""
        for attempt in range(MAX_COMMIT_ATTEMPTS):
            try:
                current = self.read()
                if over_corrupt:
                    current.snapshots  # noqa: B018 -- a generation whose pages do not read is corrupt too
            except CorruptSnapshotError:
                if not over_corrupt:
                    raise
                current = Manifest(self.generations()[-1], Tree(self.pages), unreadable=True)
            try:
                changed = change(current)
            except MissingPageError:
                if current.generation in self.generations():
                    raise  # its generation is still there: the page was lost, not replaced (repair the run)
                continue  # a page of a generation pruned meanwhile: read the newest again
            new = replace(
                changed,
                tree=changed.tree.sealed(),
                generation=current.generation + 1,
                written=None,
                token=uuid.uuid4().hex,
                parent=current.token,
            )
            # Pages first, under names no other writer uses: the generation is the commit, and a page it does
            # not reference (this attempt lost its race) is an orphan for gc.
            for rel, data in new.tree.written().items():
                self._create_page(rel, data)
            new = replace(new, tree=new.tree.committed())
            try:
                self.storage.create_exclusive(generation_name(new.generation), new.to_json())
            except FileExistsError:
                self.conflicts += 1
                logger.debug("generation %d was committed by another writer; retrying", new.generation)
                time.sleep(random.uniform(0, min(0.5, 0.005 * 2 ** min(attempt, 7))))
                continue
            newest = self.generations()
            if newest and newest[-1] > new.generation and not self._built_upon(new):
                # While this writer was between its read and its create, others committed more than
                # KEEP_GENERATIONS generations and pruned this number, so the create succeeded below the newest
                # generation, where no reader looks. Not a commit: commit again on top of the newest. (If the
                # generation after it was pruned too, this cannot tell; ``change`` must then accept finding its
                # own change already applied, as the store's save and delete do.)
                self.conflicts += 1
                logger.debug("generation %d was recreated below the newest %d; retrying", new.generation, newest[-1])
                continue
            self._prune(new.generation, newest)
            return new
        raise CommitConflictError(
            f"could not commit to {self.storage.url} after {MAX_COMMIT_ATTEMPTS} attempts: other writers kept "
            "committing first. The snapshot object was written; retry the save."
        )

    def _create_page(self, rel: str, data: bytes) -> None:
        """Create page ``rel`` (a name this writer drew at random) with ``data``.

        A create whose response was lost and that the store's client retried finds the page there: it is this
        writer's own if it holds the same bytes, and the commit goes on. A page there with other bytes is no
        page of this commit: the commit stops before its generation, so nothing is committed.
        """
        try:
            self.storage.create_exclusive(rel, data)
        except FileExistsError as exc:
            try:
                stored: bytes | None = self.storage.read(rel)
            except FileNotFoundError:
                stored = None
            if stored == data:
                logger.debug("manifest page %s was created by this commit's earlier try", rel)
                return
            raise StorageError(
                f"not committed to {self.storage.url}: manifest page {self.storage.url_of(rel)}, a fresh random "
                "name, already exists with other bytes (a store that does not keep what it is sent, or a copy "
                "into the run). Nothing was committed and every committed snapshot is intact: save again."
            ) from exc

    def _built_upon(self, committed: Manifest) -> bool:
        """Whether the generation after ``committed`` was built on it (rather than on a pruned predecessor)."""
        try:
            after = self.read_generation(committed.generation + 1)
        except (FileNotFoundError, CorruptSnapshotError):
            return False
        return bool(committed.token) and after.parent == committed.token

    def _prune(self, newest: int, present: list[int]) -> None:
        """Best effort: drop the generations of ``present`` (the listing made after the commit) that are too old
        for any reader to still be reading them; only those listed, so no DELETE is sent for one already gone."""
        for generation in present:
            if generation >= newest - KEEP_GENERATIONS:
                break
            try:
                self.storage.delete(generation_name(generation))
            except BucketsnapError as exc:  # pruning is an optimisation; gc() retries it
                logger.debug("could not prune manifest generation %d: %s", generation, exc)
