"""Shared pieces of the reliability campaigns: deterministic states, their checks, targets, worker processes.

Every snapshot a campaign saves is a function of its itr, so any reader can tell a correct snapshot from a
mixed (members of two snapshots), partial or altered one without knowing what was saved.
"""

from __future__ import annotations

import multiprocessing
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

#: Upload part size the campaign stores use: a "big" state spans several parts.
PART_SIZE = 5 * 2**20


def state_for(itr: int, floats: int) -> dict[str, Any]:
    """The state saved as ``itr``: three members that all encode ``itr``."""
    generator = torch.Generator().manual_seed(itr)
    return {
        "policy": torch.randn(floats, generator=generator),
        "optimizer": {"step": itr, "m": torch.full((16,), float(itr))},
        "itr": itr,
    }


def check_state(itr: int, loaded: dict[str, Any]) -> str | None:
    """None if ``loaded`` is exactly snapshot ``itr``'s state, else what is wrong (mixed, partial, altered)."""
    try:
        if loaded["itr"] != itr:
            return f"member 'itr' is {loaded['itr']}, expected {itr} (mixed snapshot)"
        opt = loaded["optimizer"]
        if opt["step"] != itr or not torch.equal(opt["m"], torch.full((16,), float(itr))):
            return f"member 'optimizer' is not itr {itr}'s (mixed snapshot)"
        policy = loaded["policy"]
        expected = torch.randn(policy.numel(), generator=torch.Generator().manual_seed(itr))
        if not torch.equal(policy, expected):
            return f"member 'policy' differs from itr {itr}'s"
    except (KeyError, TypeError, AttributeError) as exc:
        return f"malformed state: {exc!r}"
    return None


@dataclass
class Target:
    """Where a campaign writes: ``url(name)`` gives a fresh run URL; ``options`` the storage options."""

    name: str
    base: str
    options: dict[str, Any] = field(default_factory=dict)

    def url(self, name: str = "run") -> str:
        return f"{self.base}/{name}-{uuid.uuid4().hex[:8]}"


def local_target() -> Target:
    return Target("local", tempfile.mkdtemp(prefix="bucketsnap-campaign-"))


def s3_target(server: Any) -> Target:
    import servers

    return Target("s3", f"s3://{server.create_bucket()}", servers.s3_storage_options(server))


def gcs_target(server: Any) -> Target:
    import servers

    return Target("gcs", f"gs://{server.create_bucket()}", servers.gcs_storage_options(server))


def azure_target(server: Any) -> Target:
    import servers

    return Target("azure", f"az://{server.create_container()}", servers.azure_storage_options(server))


_CONTEXT: BaseContext | None = None


def context() -> BaseContext:
    """A forkserver context with torch and bucketsnap preloaded: a worker starts in milliseconds, not seconds."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "bucketsnap", "benchmarks.campaign_common"])
        _CONTEXT = ctx
    return _CONTEXT
