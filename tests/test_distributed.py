"""Distributed saves: 2 and 4 gloo ranks on one machine, each writing its own archive, one atomic commit.

Each rank is a process running tests/workers/dist_worker.py (forked from helpers.FORKSERVER, torch imported);
every process is reaped (killed if it outlives the test's deadline) whatever happens.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bucketsnap import DistributedSaveError, Sharded, SnapshotStore
from bucketsnap._distributed_save import _assign, _check_plans
from bucketsnap.distributed import load_rank, shard_key, shard_keys
from conftest import Backend
from helpers import Worker

WORKER = str(Path(__file__).parent / "workers" / "dist_worker.py")
#: Seconds a whole multi-process run may take before its stragglers are killed (the group timeout is 30 s).
DEADLINE = 120


@dataclass
class Rank:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    def only(self, event: str, **match: Any) -> dict[str, Any]:
        found = [e for e in self.events if e["event"] == event and all(e.get(k) == v for k, v in match.items())]
        assert len(found) == 1, f"expected one {event} {match} event, got {self.events}\n{self.stderr[-3000:]}"
        return found[0]


def run_ranks(
    scenario: str,
    world: int,
    backend: Backend,
    url: str,
    tmp_path: Path,
    meanwhile: Callable[[list[Worker], Path], None] | None = None,
) -> list[Rank]:
    """Run ``world`` ranks of ``scenario`` (calling ``meanwhile(procs, logs)`` once started); return what they said."""
    init = tmp_path / f"init-{uuid.uuid4().hex}"
    logs = tmp_path / f"logs-{uuid.uuid4().hex[:8]}"
    logs.mkdir()
    procs: list[Worker] = []
    try:
        for rank in range(world):
            argv = [scenario, str(rank), str(world), str(init), url, json.dumps(backend.options)]
            procs.append(Worker(WORKER, argv, logs / f"{rank}.out", logs / f"{rank}.err"))
        if meanwhile is not None:
            meanwhile(procs, logs)
        for proc in procs:
            proc.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: a rank still ran after {DEADLINE} s: {_tails(logs, world)}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    ranks = []
    for rank, proc in enumerate(procs):
        lines = (logs / f"{rank}.out").read_text().splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        ranks.append(Rank(proc.returncode, events, (logs / f"{rank}.err").read_text()))
        crashed = [e for e in events if e["event"] == "crashed"]
        assert not crashed, f"rank {rank} crashed: {crashed[0]['traceback']}"
        expected = (0, -signal.SIGKILL, -signal.SIGTERM)
        assert proc.returncode in expected, f"rank {rank} exited {proc.returncode}: {ranks[-1].stderr}"
    return ranks


def _tails(logs: Path, world: int) -> str:
    return "\n".join(
        f"rank {r}: {(logs / f'{r}.out').read_text()[-1500:]}{(logs / f'{r}.err').read_text()[-1500:]}"
        for r in range(world)
    )


def expected_state(itr: int, rank: int) -> dict[str, Any]:
    sys.path.insert(0, str(Path(WORKER).parent))
    import dist_worker

    return dist_worker.state(itr, rank)


def check_snapshot(store: SnapshotStore, itr: int, world: int) -> None:
    """A single process reads the policy out of a multi-rank snapshot, and every rank's shards."""
    info = store.verify(itr)
    assert store.load(itr, keys=["policy"])["policy"]["w"].equal(expected_state(itr, 0)["policy"]["w"])
    assert shard_keys(info, "optimizer") == [shard_key("optimizer", r) for r in range(world)]
    assert len({m.path for m in info.members.values()}) == world  # one archive per rank (None: rank 0's)
    for rank in range(world):
        view = load_rank(store, itr, rank=rank)
        expected = expected_state(itr, rank)
        assert view["optimizer"]["m"].equal(expected["optimizer"].value["m"])
        assert np.array_equal(view["replay"], expected["replay"].value)
        assert view["step"] == itr


def assert_no_leftovers(store: SnapshotStore) -> None:
    referenced = set().union(*(info.objects() for info in store.infos()))
    present = {f"snapshots/{name}" for name in store.storage.list("snapshots")}
    assert present == referenced, f"unreferenced: {sorted(present - referenced)}"


@pytest.mark.parametrize(
    ("backend_name", "world"), [("local", 2), pytest.param("s3", 2, marks=pytest.mark.s3)], ids=["local-2", "s3-2"]
)
def test_round_trip(backend_name: str, world: int, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    backend: Backend = request.getfixturevalue(f"{backend_name}_backend")
    url = backend.url("dist")
    ranks = run_ranks("roundtrip", world, backend, url, tmp_path)
    assert [r.returncode for r in ranks] == [0] * world
    for rank in ranks:
        checked = rank.only("checked")
        assert checked["reduced"] == checked["expected"], "the training loop's all_reduce was disturbed"
    for itr in (0, 1, 2):
        infos = [{**r.only("saved", itr=itr), "rank": None} for r in ranks]
        assert all(i == infos[0] for i in infos), f"every rank returns the same SnapshotInfo: {infos}"
    store = SnapshotStore(url, storage_options=backend.options)
    assert store.itrs() == [0, 1, 2]
    for itr in (0, 1, 2):
        check_snapshot(store, itr, world)
    assert store.gc(min_age=0) == []  # nothing to collect
    assert_no_leftovers(store)
    assert store.info(2).metrics == {"itr": 2}


def test_restore_at_a_different_world_size(local_backend: Backend, tmp_path: Path) -> None:
    url = local_backend.url("resize")
    saved = run_ranks("save", 4, local_backend, url, tmp_path)
    assert [r.returncode for r in saved] == [0] * 4
    restored = run_ranks("restore", 2, local_backend, url, tmp_path)
    assert [r.returncode for r in restored] == [0, 0]
    shards = [r.only("restored", itr=2, saved_world=4)["shards"] for r in restored]
    assert shards == [["optimizer@rank0", "optimizer@rank2"], ["optimizer@rank1", "optimizer@rank3"]]
    store = SnapshotStore(url)
    check_snapshot(store, 2, 4)
    with pytest.raises(KeyError, match="4 shards of 'optimizer', none for rank 5"):
        load_rank(store, rank=5)


def test_a_failing_rank_fails_every_rank_and_commits_nothing(local_backend: Backend, tmp_path: Path) -> None:
    url = local_backend.url("errors")
    ranks = run_ranks("errors", 2, local_backend, url, tmp_path)
    assert [r.returncode for r in ranks] == [0, 0]
    expected = {
        1: ("TypeError", "lock"),  # serialization on rank 1
        2: ("OSError", "injected write failure on rank 1"),
        3: ("ValueError", "rank 1 passes keys"),
        0: ("SnapshotExistsError", "itr 0 is already committed"),
    }
    for itr, (kind, text) in expected.items():
        errors = [r.only("error", itr=itr) for r in ranks]
        assert [e["type"] for e in errors] == [kind, kind], errors
        assert text in errors[0]["message"] and errors[0]["message"] == errors[1]["message"], errors
    assert ranks[0].only("saved", itr=4) == {**ranks[1].only("saved", itr=4), "rank": 0}
    store = SnapshotStore(url)
    assert store.itrs() == [0, 4]
    check_snapshot(store, 0, 2)
    check_snapshot(store, 4, 2)
    assert_no_leftovers(store)  # the failed saves deleted what they had written


def test_a_rank_killed_mid_save_commits_nothing_and_nobody_hangs(local_backend: Backend, tmp_path: Path) -> None:
    url = local_backend.url("kill")
    ranks = run_ranks("kill", 4, local_backend, url, tmp_path)
    assert ranks[1].returncode == -signal.SIGKILL
    for rank in (0, 2, 3):
        assert ranks[rank].returncode == 0, ranks[rank].stderr[-3000:]
        error = ranks[rank].only("error", itr=1)
        assert error["type"] == "DistributedSaveError", error
        assert "another rank died" in error["message"] and url in error["message"]
    store = SnapshotStore(url)
    assert store.itrs() == [0]
    check_snapshot(store, 0, 4)
    # the survivors' archives of itr 1 (and rank 1's temp file) are orphans; gc removes exactly those
    removed = store.gc(min_age=0)
    assert all("000000000001-" in path for path in removed if path.startswith("snapshots/")), removed
    assert_no_leftovers(store)
    check_snapshot(store, 0, 4)


def test_sigterm_on_one_rank_gives_one_final_snapshot_of_every_rank(local_backend: Backend, tmp_path: Path) -> None:
    url = local_backend.url("preempt")

    def preempt_rank_1(procs: list[Worker], logs: Path) -> None:
        deadline = time.monotonic() + DEADLINE
        while '"itr": 5' not in (logs / "1.out").read_text():  # a few steps in lockstep first
            assert time.monotonic() < deadline and procs[1].poll() is None, (logs / "1.err").read_text()
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)  # one host is preempted, the other is not told

    ranks = run_ranks("preempt", 2, local_backend, url, tmp_path, meanwhile=preempt_rank_1)
    assert [r.returncode for r in ranks] == [-signal.SIGTERM, -signal.SIGTERM], [r.stderr[-2000:] for r in ranks]
    store = SnapshotStore(url)
    final = store.info("last")
    steps = [max(e["itr"] for e in r.events if e["event"] == "step") for r in ranks]
    assert store.itrs() == [0, final.itr] and steps == [final.itr, final.itr] and final.itr >= 5
    check_snapshot(store, final.itr, 2)
    assert_no_leftovers(store)


# -- in one process ----------------------------------------------------------------------------------------------


def test_a_commit_that_landed_is_never_undone_by_a_failure_after_it(local_backend: Backend, tmp_path: Path) -> None:
    """Once a commit has landed nothing deletes its objects: a denied delete of the replaced archive is a
    warning and every rank reports success; after a lost commit response and a failed re-read rank 0 cannot
    tell, so it fails, but no rank deletes its archive, and the snapshot that did commit verifies."""
    url = local_backend.url("landed")
    ranks = run_ranks("landed", 2, local_backend, url, tmp_path)
    store = SnapshotStore(url, storage_options=local_backend.options)
    for rank in ranks:
        rank.only("saved", itr=0)
        assert "AccessDenied" not in "".join(str(e) for e in rank.events)
    check_snapshot(store, 0, 2)
    assert store.itrs() == [0, 1]
    check_snapshot(store, 1, 2)  # committed although rank 0 could not tell: every rank kept its archive
    ranks[0].only("error", itr=1)


def test_sharded_values_in_a_single_process(memory_backend: Backend) -> None:
    store = memory_backend.store()
    info = store.save(3, {"policy": torch.ones(2), "optimizer": Sharded({"m": torch.zeros(2)})})
    assert info.keys() == ["policy", "optimizer@rank0"]
    assert load_rank(store, 3)["optimizer"]["m"].equal(torch.zeros(2))
    future = store.save_async(4, {"policy": torch.ones(2), "optimizer": Sharded({"m": torch.zeros(2)})})
    assert future.result().keys() == ["policy", "optimizer@rank0"]
    with pytest.raises(ValueError, match="not a valid member name"):
        store.save(5, {"bad@key": Sharded(1)})
    assert store.save(6, {"policy": 1}, process_group="local").path.endswith(".zip")
    with pytest.raises(KeyError, match="no sharded key 'policy'"):
        shard_keys(info, "policy")
    store.close()


def test_replicated_keys_are_spread_over_ranks_by_size() -> None:
    owners = _assign({"policy": 400, "critic": 300, "target": 200, "step": 0}, 2)
    assert owners == {"policy": 0, "critic": 1, "target": 1, "step": 0}
    assert set(_assign({"a": 1}, 4).values()) == {0}


def test_ranks_that_disagree_are_refused_before_writing() -> None:
    def plan(layout: list[tuple[str, bool]], sizes: dict[str, int], itr: int = 1) -> dict[str, Any]:
        return {"itr": itr, "layout": layout, "sizes": sizes}

    base = plan([("policy", False), ("opt", True)], {"policy": 8})
    assert _check_plans([base, base], "memory://x") is None
    cases = {
        "saves itr 2": plan([("policy", False), ("opt", True)], {"policy": 8}, itr=2),
        "Sharded(opt)": plan([("policy", False), ("opt", False)], {"policy": 8, "opt": 0}),
        "wrap per-rank values in bucketsnap.Sharded": plan([("policy", False), ("opt", True)], {"policy": 16}),
    }
    for text, other in cases.items():
        failure = _check_plans([base, other], "memory://x")
        assert failure is not None and failure.rank == 1 and text in failure.message, failure


def test_repair_does_not_recover_one_rank_of_an_uncommitted_save(local_backend: Backend) -> None:
    store = local_backend.store()
    store.save(1, {"policy": torch.ones(2), "opt": Sharded(torch.zeros(2))})
    rank_archive = store.info(1).path.replace("-rank0.zip", "-rank1.zip")
    with store.storage.write(rank_archive) as f:  # what a failed save of itr 2 could leave behind
        from bucketsnap._archive import ArchiveWriter

        writer = ArchiveWriter(f)
        writer.add("opt@rank1", torch.zeros(2))
        writer.finish({"format": "bucketsnap", "itr": 2, "created": "2026-01-01T00:00:00+00:00", "world_size": 2})
    newest = store.storage.path(f"manifest/{store._log.generations()[-1] + 1:012d}.json")
    store.storage.fs.pipe_file(newest, b"{torn")  # repair rebuilds only over a generation that does not read
    store.repair()
    assert store.itrs() == [1]


def test_a_background_save_is_not_disturbed_by_errors_of_the_caller(memory_backend: Backend) -> None:
    store = memory_backend.store()
    lock = threading.Lock()
    future = store.save_async(1, {"optimizer": Sharded({"lock": lock})})
    with pytest.raises(TypeError):
        future.result()
    store.flush()  # seen through the future: the store does not raise it a second time
    assert store.itrs() == []
    assert DistributedSaveError.__mro__[1].__name__ == "BucketsnapError"
    store.close()
