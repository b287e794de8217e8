"""``bucketsnap ls`` of a folder of runs reads, per run, what its count and last itr need (the listing, the newest
generation, and the pages down to the last entry), not every page of every run (docs/cli.md)."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Any

import pytest
from click.testing import CliRunner

import bucketsnap._storage as storage_module
from bucketsnap import SnapshotStore
from bucketsnap._cli import cli
from bucketsnap._pages import PAGE_DIR


def test_ls_of_a_folder_of_runs_reads_no_page_of_old_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = f"memory://ls-cost/{uuid.uuid4().hex}"
    big = SnapshotStore(f"{folder}/big")
    real = big.save(0, {"step": 0})
    big._log.commit(lambda current: [real] + [replace(real, itr=i) for i in range(1, 3001)])  # 3,001: a tail of 1
    small = SnapshotStore(f"{folder}/small")
    small.save(7, {"step": 7})
    reads: list[str] = []
    real_read = storage_module.Storage.read

    def read(self: Any, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        reads.append(rel)
        return real_read(self, rel, start, end)

    monkeypatch.setattr(storage_module.Storage, "read", read)
    result = CliRunner().invoke(cli, ["ls", "--json", folder], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)
    assert [(r["snapshots"], r["last_itr"]) for r in runs] == [(3001, 3000), (1, 7)]
    page_reads = [r for r in reads if r.startswith(f"{PAGE_DIR}/")]
    assert page_reads == [], page_reads  # the last entry is in the tail: no page at all (125 before)
    assert len(reads) == 2, reads  # each run's newest generation
