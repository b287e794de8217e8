"""Reliability campaigns: crash, fault injection, concurrent writers, readers during writes, gc during saves.
Prints figures.

    python -m benchmarks.campaigns --short            # a minute or so; what CI runs (tests/test_campaigns.py)
    python -m benchmarks.campaigns --long             # hundreds of kills; the figures in docs/reliability.md
    python -m benchmarks.campaigns --long --backends local --only crash,faults --json out.json

S3 runs against LocalStack started by tests/servers.py (or BUCKETSNAP_TEST_S3_ENDPOINT), GCS (--backends gcs)
against fake-gcs-server (or BUCKETSNAP_TEST_GCS_ENDPOINT).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    campaign_concurrent,
    campaign_crash,
    campaign_faults,
    campaign_gc,
    campaign_readers,
)
from benchmarks.campaign_common import Target, azure_target, gcs_target, local_target, s3_target  # noqa: E402

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "short": {
        "crash": {"local": {"kills": 4}, "s3": {"kills": 3}, "gcs": {"kills": 3}, "azure": {"kills": 3}},
        "faults": {"memory": {"saves": 80}},
        "concurrent": {
            "local": {"writers": 4, "per_writer": 6},
            "s3": {"writers": 3, "per_writer": 4},
            "gcs": {"writers": 3, "per_writer": 4},
            "azure": {"writers": 3, "per_writer": 4},
        },
        "readers": {
            "local": {"readers": 2, "saves": 10},
            "s3": {"readers": 2, "saves": 6},
            "gcs": {"readers": 2, "saves": 6},
            "azure": {"readers": 2, "saves": 6},
        },
        "gc": {
            "local": {"writers": 2, "per_writer": 8},
            "s3": {"writers": 2, "per_writer": 4},
            "gcs": {"writers": 2, "per_writer": 4},
            "azure": {"writers": 2, "per_writer": 4},
        },
    },
    "long": {
        "crash": {
            "local": {"kills": 200, "per_run": 10, "max_delay": 1.0},
            "s3": {"kills": 120, "per_run": 10},
            "gcs": {"kills": 120, "per_run": 10},
            "azure": {"kills": 120, "per_run": 10},
        },
        "faults": {"memory": {"saves": 1000}, "s3": {"saves": 300}},
        "concurrent": {
            "local": {"writers": 8, "per_writer": 50},
            "s3": {"writers": 8, "per_writer": 50},
            "gcs": {"writers": 8, "per_writer": 50},
            "azure": {"writers": 8, "per_writer": 50},
        },
        "readers": {
            "local": {"readers": 4, "saves": 150},
            "s3": {"readers": 4, "saves": 100},
            "gcs": {"readers": 4, "saves": 100},
            "azure": {"readers": 4, "saves": 100},
        },
        "gc": {
            "local": {"writers": 4, "per_writer": 50},
            "s3": {"writers": 3, "per_writer": 25},
            "gcs": {"writers": 3, "per_writer": 25},
            "azure": {"writers": 3, "per_writer": 25},
        },
    },
}
CAMPAIGNS = ("crash", "faults", "concurrent", "readers", "gc")


def run_campaign(name: str, target: Target, params: dict[str, Any], seed: int) -> Any:
    if name == "crash":
        return campaign_crash.run(target, seed=seed, **params)
    if name == "concurrent":
        return campaign_concurrent.run(target, **params)
    if name == "readers":
        return campaign_readers.run(target, **params)
    if name == "gc":
        return campaign_gc.run(target, seed=seed, **params)
    if target.name == "memory":
        return campaign_faults.run(seed=seed, **params)
    bucket = target.base.removeprefix("s3://")
    return campaign_faults.run(seed=seed, target_protocol="s3", target_options=target.options, bucket=bucket, **params)


def run_all(
    profile: str,
    targets: dict[str, Target],
    *,
    only: tuple[str, ...] = CAMPAIGNS,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, list[Any]]:
    """Run each campaign of ``profile`` on each of ``targets`` it lists; return the figures by campaign."""
    results: dict[str, list[Any]] = {}
    for name in only:
        for backend, params in PROFILES[profile][name].items():
            if backend not in targets:
                continue
            log(f"{name} on {backend}: {params}")
            figures = run_campaign(name, targets[backend], params, seed)
            log(f"  {figures}")
            results.setdefault(name, []).append(figures)
    return results


def table(results: dict[str, list[Any]]) -> str:
    """Markdown tables, one per campaign, one row per backend."""
    out = []
    for name, rows in results.items():
        dicts = [{f.name: _cell(getattr(r, f.name)) for f in fields(r)} for r in rows]
        columns = list(dicts[0])
        out.append(f"### {name}\n")
        out.append("| " + " | ".join(columns) + " |")
        out.append("|" + "---|" * len(columns))
        out += ["| " + " | ".join(d[c] for c in columns) + " |" for d in dicts]
        out.append("")
    return "\n".join(out)


def _plain(figures: Any) -> dict[str, Any]:
    """A figures dataclass as JSON-able values (``asdict`` would turn a Counter into a Counter of pairs)."""
    return {f.name: dict(v) if isinstance(v, dict) else v for f in fields(figures) for v in [getattr(figures, f.name)]}


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {n}" for k, n in sorted(v.items())) or "-"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--short", dest="profile", action="store_const", const="short")
    size.add_argument("--long", dest="profile", action="store_const", const="long")
    parser.add_argument("--backends", default="local,memory,s3", help="comma-separated: local, memory, s3, gcs, azure")
    parser.add_argument("--only", default=",".join(CAMPAIGNS), help="comma-separated campaigns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.getLogger("bucketsnap").setLevel(logging.ERROR)  # retries of injected faults are expected
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the S3 server and clean up on kill
    backends = args.backends.split(",")
    targets: dict[str, Target] = {"memory": Target("memory", "memory://campaign")}
    started: list[Any] = []
    if "local" in backends:
        targets["local"] = local_target()
    if {"s3", "gcs", "azure"} & set(backends):
        import servers

        if "s3" in backends:
            started.append(servers.s3_server())
            targets["s3"] = s3_target(started[-1])
        if "gcs" in backends:
            started.append(servers.gcs_server())
            targets["gcs"] = gcs_target(started[-1])
        if "azure" in backends:
            started.append(servers.azure_server())
            targets["azure"] = azure_target(started[-1])
    targets = {k: v for k, v in targets.items() if k in backends}
    try:
        results = run_all(args.profile or "short", targets, only=tuple(args.only.split(",")), seed=args.seed)
    finally:
        for server in started:
            server.stop()
        if "local" in targets:
            shutil.rmtree(targets["local"].base, ignore_errors=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({k: [_plain(r) for r in v] for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
