"""PyTorch Distributed Checkpoint (DCP) through bucketsnap: a ``StorageWriter`` and a ``StorageReader``.

``dcp.save(state_dict, storage_writer=SnapshotWriter(url, itr=step))``, ``dcp.async_save(...)`` and
``dcp.load(state_dict, storage_reader=SnapshotReader(url))`` work unchanged, with or without a process group,
and a DCP checkpoint becomes an ordinary bucketsnap snapshot: committed atomically in the run's manifest log,
covered by checksums, found by ``last``, kept or dropped by retention, listed, verified, copied and collected by
``bucketsnap ls/show/verify/cp/gc``.

How DCP's steps map onto bucketsnap's save (the steps of :mod:`bucketsnap._pipeline`):

1. **plan** (``prepare_global_plan``, on the coordinator): read the base generation, refuse an itr already
   committed (unless ``overwrite``), draw the save's token, and name a member for every write item of every rank.
2. **write** (``write_data``, on every rank): each rank writes its items to its own archive
   ``snapshots/<itr>-<token>-rank<r>.zip``, one member per item (:mod:`bucketsnap._dcp_format`).
3. **gather**: DCP gathers every rank's write results to the coordinator. If any rank failed, DCP raises on
   every rank and never calls ``finish``: nothing is committed.
4. **commit** (``finish``, on the coordinator): write DCP's ``Metadata`` (as JSON, no pickle) into the
   snapshot's own small archive ``snapshots/<itr>-<token>.zip``, then commit one manifest generation that lists
   every rank's members, through the same :class:`~bucketsnap._commit.Committer` as every save: the exclusive
   create of that generation is the one instant at which the checkpoint becomes visible.

The trade-off: DCP runs its own collectives (and gathers its own errors), so a DCP save uses bucketsnap's
naming, base read, fence and commit but not its ``World``. A rank that fails deletes its own archive; the
archives other ranks wrote for a save that failed are orphans, left for :meth:`~bucketsnap.SnapshotStore.gc`.

Reading: ``read_data`` fetches exactly the byte range of each requested item (a block of rows of a tensor
when DCP's planner reshards), straight from the archive that holds it; the metadata is one small member.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future as ConcurrentFuture
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from bucketsnap._archive import load_member
from bucketsnap._commit import Committer
from bucketsnap._dcp_format import (
    METADATA_KEY,
    Item,
    encode_bytes_item,
    metadata_from_tree,
    metadata_tree,
    read_tensor,
    write_items,
)
from bucketsnap._info import SnapshotInfo, check_metrics
from bucketsnap._manifest import Manifest, ManifestLog, Which, archive_path, new_token, parse_which
from bucketsnap._pools import Pool
from bucketsnap._saving import StoredObjects, check_itr, meta, write_archive
from bucketsnap._snapshot import Snapshot
from bucketsnap._storage import Storage
from bucketsnap._store import SnapshotStore, as_store
from bucketsnap._values import encode
from bucketsnap.errors import BucketsnapError, SnapshotNotFoundError

__all__ = ["SnapshotReader", "SnapshotWriter"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
#: Items a load reads ahead of the one it hands to DCP's planner.
READ_AHEAD = 4


@dataclass(frozen=True)
class _RankPlan:
    """What the coordinator tells each rank in its plan's ``storage_data``."""

    rank: int
    token: str
    created: datetime
    keys: dict[MetadataIndex, str]  # write item -> member key


@dataclass(frozen=True)
class _Written:
    """A write result's ``storage_data``: where the item went, and the archive that holds it."""

    item: Item
    path: str
    size: int
    checksum: str


class SnapshotWriter(StorageWriter):
    """A DCP ``StorageWriter`` that commits each checkpoint as snapshot ``itr`` of the run at ``url_or_store``.

    Args:
        url_or_store: the run (a URL or a :class:`~bucketsnap.SnapshotStore`, whose retention applies).
        itr: the snapshot's iteration (the training step).
        metrics: metrics recorded with the snapshot (as in :meth:`~bucketsnap.SnapshotStore.save`).
        overwrite: replace snapshot ``itr`` if it is committed (else the save fails, committing nothing).
        storage_options: fsspec options, with a URL.

    Example:
        >>> import torch, torch.distributed.checkpoint as dcp
        >>> state = {"w": torch.arange(4.0), "step": 3}
        >>> _ = dcp.save(state, storage_writer=SnapshotWriter("memory://doc/dcp", itr=3))
        >>> out = {"w": torch.zeros(4), "step": 0}
        >>> dcp.load(out, storage_reader=SnapshotReader("memory://doc/dcp"))
        >>> out["w"].tolist(), out["step"]
        ([0.0, 1.0, 2.0, 3.0], 3)
    """

    def __init__(
        self,
        url_or_store: str | SnapshotStore,
        itr: int,
        *,
        metrics: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.store = as_store(url_or_store, storage_options=storage_options)
        self.itr = check_itr(itr)
        self.metrics = check_metrics(dict(metrics or {}))
        self.overwrite = overwrite
        self._base: Manifest | None = None
        self._token = ""
        self._created = datetime.now(timezone.utc)

    @property
    def url(self) -> str:
        return self.store.url

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        _no_checkpoint_id(checkpoint_id, self.url, "SnapshotWriter(url, itr=...)")
        self._base = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives") is False:  # every rank would plan alone, and commit alone
            raise ValueError(
                f"save to {self.url}: SnapshotWriter commits every rank's items in one snapshot, through DCP's "
                "collectives; call dcp.save without use_collectives=False"
            )

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.url)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """On the coordinator, before any rank writes: the base read, the itr check, the token, the names."""
        self._base = _committer(self.store).base(self.itr, overwrite=self.overwrite)
        token, created = new_token(), datetime.now(timezone.utc)
        self._token, self._created = token, created
        taken = {METADATA_KEY}
        out = []
        for rank, plan in enumerate(plans):
            keys = {item.index: _member_key(item.index, taken) for item in plan.items}
            out.append(dataclasses.replace(plan, storage_data=_RankPlan(rank, token, created, keys)))
        return out

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """This rank's items to its own archive (nothing written for a rank with no item)."""
        rank_plan = plan.storage_data
        if not isinstance(rank_plan, _RankPlan):
            raise BucketsnapError(f"save to {self.url}: the plan was not made by SnapshotWriter.prepare_global_plan")
        future: Future[list[WriteResult]] = Future()
        if not plan.items:
            future.set_result([])
            return future
        storage = self.store.storage
        path = archive_path(self.itr, rank_plan.token, rank_plan.rank)
        values: list[tuple[str, Any]] = []
        sizes: dict[str, int] = {}
        for item in plan.items:
            data = planner.resolve_data(item)
            key = rank_plan.keys[item.index]
            if item.type == WriteItemType.BYTE_IO:
                value = encode_bytes_item(data)  # type: ignore[arg-type]
                sizes[key] = len(data.getbuffer()) if isinstance(data, io.BytesIO) else 0
            else:
                assert isinstance(data, torch.Tensor)
                value = data
                sizes[key] = int(data.numel() * data.element_size())
            values.append((key, value))
        archive_meta = meta(self.itr, rank_plan.created, self.metrics)
        archive_meta.update(rank=rank_plan.rank, dcp=True)
        try:
            written = write_items(storage, path, values, archive_meta)
        except BaseException:
            _delete_quietly(self.store, path)
            raise
        by_key = {key: index for index, key in rank_plan.keys.items()}
        results = [
            WriteResult(
                index=by_key[key],
                size_in_bytes=sizes[key],
                storage_data=_Written(item, path, written.size, written.checksum),
            )
            for key, item in written.items.items()
        ]
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator, once every rank wrote: store ``metadata`` and commit the snapshot."""
        if self._base is None:
            raise BucketsnapError(f"save to {self.url}: finish() before prepare_global_plan()")
        items: dict[MetadataIndex, Item] = {}
        archives: dict[str, tuple[int, str]] = {}
        for rank_results in results:
            for result in rank_results:
                written: _Written = result.storage_data
                items[result.index] = dataclasses.replace(
                    written.item, member=dataclasses.replace(written.item.member, path=written.path)
                )
                archives[written.path] = (written.size, written.checksum)
        token, created = self._token, self._created
        tree = metadata_tree(metadata, items)
        storage = self.store.storage
        own = archive_path(self.itr, token)
        archive_meta = meta(self.itr, created, self.metrics)
        archive_meta.update(dcp=True)
        try:
            stored = write_archive(
                storage,
                own,
                {METADATA_KEY: encode(tree)},
                archive_meta,
                level=3,
                threads=0,
                objects=StoredObjects(frozenset(), token),
            )
        except BaseException:  # nothing was committed: no rank's archive can be needed
            for path in (own, *archives):
                _delete_quietly(self.store, path)
            raise
        members = {METADATA_KEY: stored.members[METADATA_KEY]}
        members.update({item.key: item.member for item in items.values()})
        info = SnapshotInfo(
            itr=self.itr,
            path=own,
            url=storage.url_of(own),
            size=stored.size,
            created=created,
            metrics=self.metrics,
            members=members,
            checksums={own: stored.checksum, **{path: checksum for path, (_, checksum) in archives.items()}},
        )
        _committer(self.store).commit(info, self._base, overwrite=self.overwrite, written=[own, *archives])

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never chosen by DCP on its own: pass storage_writer=SnapshotWriter(url, itr=...)


class SnapshotReader(StorageReader):
    """A DCP ``StorageReader`` of a snapshot that :class:`SnapshotWriter` committed.

    Args:
        url_or_store: the run (a URL or a :class:`~bucketsnap.SnapshotStore`).
        which: ``"last"``, ``"first"`` or an int itr; resolved once, by the first :meth:`read_metadata`.
        allow_pickle: allow values that bucketsnap could only cloudpickle (non-tensor values of types it has no
            codec for, a custom planner's data); loading them runs code from the snapshot.
        storage_options: fsspec options, with a URL.

    Raises (from ``dcp.load``):
        SnapshotNotFoundError: no such snapshot (DCP wraps it on multi-rank loads).
    """

    def __init__(
        self,
        url_or_store: str | SnapshotStore,
        which: Which = "last",
        *,
        allow_pickle: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.store = as_store(url_or_store, storage_options=storage_options)
        self.which = parse_which(which)
        self.allow_pickle = allow_pickle
        self.info: SnapshotInfo | None = None
        self._items: dict[MetadataIndex, Item] = {}

    @property
    def url(self) -> str:
        return self.store.url

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        _no_checkpoint_id(checkpoint_id, self.url, "SnapshotReader(url, which=...)")

    def read_metadata(self) -> Metadata:
        """The snapshot's DCP metadata: one manifest lookup, one small member."""
        if self.info is None:
            self.info = self.store.info(self.which)
        info = self.info
        if METADATA_KEY not in info.members:
            raise SnapshotNotFoundError(
                f"snapshot itr {info.itr} at {info.url} was not saved by bucketsnap.dcp.SnapshotWriter (it has "
                f"keys {info.keys()[:5]}); read it with SnapshotStore(url).load({info.itr})"
            )
        snapshot = Snapshot(
            self.store.storage, info, allow_pickle=self.allow_pickle, max_member_size=self.store.max_member_size
        )
        where = f"DCP metadata of snapshot itr {info.itr} ({info.url})"
        metadata = metadata_from_tree(snapshot[METADATA_KEY], info.members, info.path, where)
        metadata.storage_meta = StorageMeta(checkpoint_id=info.url)
        self._items = metadata.storage_data
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._items = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        assert self.info is not None
        return dataclasses.replace(plan, storage_data=(self.info.itr, self.info.path))

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Refuse ranks that resolved ``which`` to different snapshots (a commit landed between their reads)."""
        seen = {plan.storage_data for plan in plans}
        if len(seen) > 1:
            raise BucketsnapError(
                f"the ranks loading {self.url} found different snapshots for {self.which!r} "
                f"({sorted(s[0] for s in seen)}): a commit landed while they read. Pass which=<itr> to every rank"
            )
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read each requested item's bytes (only the rows asked for), a few items at a time.

        The reads run on threads, :data:`READ_AHEAD` items ahead, each straight into the tensor the planner
        resolved for it where that is contiguous; the planner is called in this thread, in the plan's order."""
        storage = self.store.storage
        for req in plan.items:
            if req.storage_index not in self._items:
                raise SnapshotNotFoundError(f"{self.url}: the snapshot holds no item {req.storage_index}")
        with Pool(max_workers=READ_AHEAD) as pool:
            pending: deque[tuple[ReadItem, torch.Tensor | None, ConcurrentFuture[Any]]] = deque()
            for req in plan.items:
                target = planner.resolve_tensor(req).detach() if req.type == LoadItemType.TENSOR else None
                pending.append((req, target, pool.submit(self._fetch, storage, req, target)))
                if len(pending) > READ_AHEAD:
                    self._deliver(planner, *pending.popleft())
            while pending:
                self._deliver(planner, *pending.popleft())
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _fetch(self, storage: Storage, req: ReadItem, target: torch.Tensor | None) -> Any:
        """The value of a BYTE_IO item, or the part of a tensor ``req`` asks for (in ``target`` if it can)."""
        item = self._items[req.storage_index]
        path = item.member.path
        assert path is not None

        def read(start: int, end: int) -> bytes:
            return storage.read(path, start, end)

        where = f"{storage.url_of(path)} member {item.member.name}"
        if req.type == LoadItemType.BYTE_IO:
            return load_member(read, item.member, where=where, allow_pickle=self.allow_pickle)
        return read_tensor(read, item, tuple(req.storage_offsets), tuple(req.lengths), where=where, out=target)

    def _deliver(
        self, planner: LoadPlanner, req: ReadItem, target: torch.Tensor | None, fetched: ConcurrentFuture[Any]
    ) -> None:
        value = fetched.result()
        if target is None:
            buffer = io.BytesIO()
            torch.save(value, buffer)  # DCP's planner torch.loads it: made here, from a decoded value
            buffer.seek(0)
            planner.load_bytes(req, buffer)
            return
        if value is not target:
            if target.size() != value.size():
                raise BucketsnapError(
                    f"{self.url}: read {list(value.size())} of {req.storage_index.fqn} for a target of "
                    f"{list(target.size())}"
                )
            target.copy_(value)
        planner.commit_tensor(req, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False


def _committer(store: SnapshotStore) -> Committer:
    storage = store.storage
    return Committer(storage, ManifestLog(storage), retention=store.retention)


def _member_key(index: MetadataIndex, taken: set[str]) -> str:
    """A member key for a write item: its fqn, made a valid key, with the chunk's offsets; unique in ``taken``."""
    base = _UNSAFE.sub("_", index.fqn)[:160] or "_"
    if base[0] in ".-":
        base = "_" + base[1:]
    if index.offset is not None and any(index.offset):
        base += "-" + "_".join(str(int(o)) for o in index.offset)
    key, n = base, 1
    while key in taken:
        key, n = f"{base}.{n}", n + 1
    taken.add(key)
    return key


def _no_checkpoint_id(checkpoint_id: Any, url: str, spelled: str) -> None:
    if checkpoint_id is not None:
        raise ValueError(
            f"checkpoint_id={checkpoint_id!r} given with a bucketsnap storage plugin for {url}: the run and the "
            f"snapshot are named by {spelled}; pass checkpoint_id=None"
        )


def _delete_quietly(store: SnapshotStore, path: str) -> None:
    with contextlib.suppress(Exception):  # else an orphan, which gc removes
        store.storage.delete(path)
