"""One rank of a multi-process test of bucketsnap.dcp: FSDP2 over gloo on CPU, DCP's own save and load.

Usage: dcp_worker.py SCENARIO RANK WORLD INIT_FILE URL OPTIONS_JSON REFERENCE

Prints one JSON object per line (``{"rank": r, "event": ..., ...}``). Scenarios:

    roundtrip  (3 ranks) ranks 0 and 1 train an FSDP2-sharded model with Adam for two steps and dcp.save its
               model and optimizer state (and a step and a string) as itr 7 through SnapshotWriter, on a group
               of their own; rank 0 writes the full state to REFERENCE. Then the same model is built and loaded
               (dcp.load of "last" through SnapshotReader) at 3 ranks, at 2 (ranks 0 and 1) and at 1 (rank 0
               alone: no process group, no FSDP); each load compares every tensor with REFERENCE and reports
               the bytes each rank read ("loaded3", "loaded2", "loaded1"). Last, ranks 0 and 1 save itr 8,
               during which rank 1 SIGKILLs itself after writing two members; rank 0 reports the "error"
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from bucketsnap import SnapshotStore
from bucketsnap.dcp import SnapshotReader, SnapshotWriter

warnings.simplefilter("ignore")  # DCP warns about single-process use; the JSON lines are what the test reads


def emit(rank: int, event: str, **fields: Any) -> None:
    print(json.dumps({"rank": rank, "event": event, **fields}), flush=True)


def model() -> torch.nn.Module:
    """Sizes that do not divide by 2 or 3, and rows that span several 128 KiB blocks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 301), torch.nn.ReLU(), torch.nn.Linear(301, 37))


def build(group: dist.ProcessGroup | None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model, sharded by FSDP2 over ``group`` (None: a plain model in one process)."""
    m = model()
    if group is not None:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(m, mesh=DeviceMesh.from_group(group, "cpu"))
    return m, torch.optim.Adam(m.parameters(), lr=1e-2)


def train(m: torch.nn.Module, opt: torch.optim.Optimizer, rank: int) -> None:
    for step in range(2):
        x = torch.randn(16, 512, generator=torch.Generator().manual_seed(100 * step + rank))
        m(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def save(rank: int, group: dist.ProcessGroup, url: str, options: dict[str, Any], reference: str, itr: int) -> None:
    m, opt = build(group)
    train(m, opt, rank)
    msd, osd = get_state_dict(m, opt)
    state = {"model": msd, "optim": osd, "step": itr, "tag": f"fsdp-{dist.get_world_size(group)}"}
    dcp.save(state, storage_writer=SnapshotWriter(url, itr=itr, storage_options=options), process_group=group)
    full_model, full_optim = get_state_dict(m, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"model": full_model, "optim": full_optim, "step": itr}, reference)
    emit(rank, "saved", itr=itr)


def load(rank: int, group: dist.ProcessGroup | None, url: str, options: dict[str, Any], reference: str) -> None:
    m, opt = build(group)
    msd, osd = get_state_dict(m, opt)  # initialises Adam's state, which the load overwrites
    local = sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in _tensors({"m": msd, "o": osd}))
    store = SnapshotStore(url, storage_options=options)
    state = {"model": msd, "optim": osd, "step": -1, "tag": ""}
    dcp.load(state, storage_reader=SnapshotReader(store), process_group=group, no_dist=group is None)
    set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    full_model, full_optim = get_state_dict(m, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    differs = None
    if rank == 0:
        ref = torch.load(reference, weights_only=False)
        differs = _first_difference({"model": full_model, "optim": full_optim, "step": state["step"]}, ref)
    world = 1 if group is None else dist.get_world_size(group)
    emit(
        rank,
        f"loaded{world}",
        step=state["step"],
        tag=state["tag"],
        differs=differs,
        bytes_read=store.storage.bytes_read,
        local_bytes=local,
    )


def roundtrip(rank: int, url: str, options: dict[str, Any], reference: str) -> None:
    pair = dist.new_group([0, 1])  # collective: every rank creates it
    if rank < 2:
        save(rank, pair, url, options, reference, itr=7)
    dist.barrier()
    load(rank, dist.group.WORLD, url, options, reference)
    dist.barrier()
    if rank < 2:
        load(rank, pair, url, options, reference)
    dist.barrier()
    if rank == 0:
        load(rank, None, url, options, reference)
    dist.barrier()
    if rank < 2:  # the last collective of rank 2, which leaves now
        kill(rank, pair, url, options, reference)


def kill(rank: int, group: dist.ProcessGroup, url: str, options: dict[str, Any], reference: str) -> None:
    """Save itr 8 on ``group``; rank 1 SIGKILLs itself after writing two of its members."""
    if rank == 1:
        import bucketsnap._dcp_format as fmt

        original, written = fmt._write_member, []

        def dying(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            written.append(out)
            if len(written) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        fmt._write_member = dying  # type: ignore[assignment]
    try:
        save(rank, group, url, options, reference + ".8", itr=8)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        emit(rank, "error", type=type(exc).__name__, message=str(exc)[:2000])


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def _first_difference(got: Any, want: Any, where: str = "") -> str | None:
    if isinstance(want, torch.Tensor):
        ok = isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
        return None if ok else where
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return f"{where} keys"
        for k in want:
            found = _first_difference(got[k], want[k], f"{where}/{k}")
            if found:
                return found
        return None
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            return f"{where} length"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            found = _first_difference(g, w, f"{where}/{i}")
            if found:
                return found
        return None
    return None if got == want else where


def main() -> None:
    scenario, rank, world, init_file, url, options, reference = (
        sys.argv[1],
        *map(int, sys.argv[2:4]),
        *sys.argv[4:8],
    )
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        {"roundtrip": roundtrip}[scenario](rank, url, json.loads(options), reference)
    except BaseException:
        emit(rank, "crashed", traceback=traceback.format_exc())
    # no destroy_process_group: a peer may be dead (the kill), and the process ends here


if __name__ == "__main__":
    main()
