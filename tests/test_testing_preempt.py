"""bucketsnap.testing's preemption helper on a real training process (tests/workers/resumable.py): SIGKILL and
SIGTERM at exact moments, on memory (carried between processes), disk and the servers; its failure reports; and
assert_same_state."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch

from bucketsnap.testing import (
    AfterCommits,
    DuringSave,
    Run,
    assert_same_state,
    preempt,
    run_training,
)
from bucketsnap.testing._shared import Journal, read_journal

WORKERS = Path(__file__).parent / "workers"
WORKER = str(WORKERS / "resumable.py")
sys.path.insert(0, str(WORKERS))

import resumable  # noqa: E402

SERVERS = [pytest.param("gcs", marks=pytest.mark.gcs), pytest.param("azure", marks=pytest.mark.azure)]


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, Any]:
    """The state after 8 steps straight through (the same on every backend), trained in this process."""
    return resumable.train(f"memory://uninterrupted-{uuid.uuid4().hex[:8]}/run")


# On local disk on demand (`-m slow`): preempt's local runs are held by the tests below on bucketsnap_local_run.
@pytest.mark.parametrize(
    "bucketsnap_run",
    ["memory", pytest.param("local", marks=pytest.mark.slow), pytest.param("s3", marks=pytest.mark.s3)],
    indirect=True,
)
def test_sigkill_after_commits_resumes_from_the_last(bucketsnap_run: Run, uninterrupted: dict[str, Any]) -> None:
    result = preempt(WORKER, bucketsnap_run, args=[bucketsnap_run.url], at=AfterCommits(2), signal=signal.SIGKILL)
    assert result.killed.returncode == -signal.SIGKILL and result.killed.signalled
    assert result.killed.committed == result.committed_at_signal == (1, 3)
    assert result.killed.resumed_from is None
    assert (result.resumed.resumed_from, result.resumed.committed) == (3, (5, 7))
    assert not result.resumed.signalled and result.resumed.returncode == 0
    assert result.store().itrs() == [1, 3, 5, 7]
    assert_same_state(result.store().load("last"), uninterrupted)


@pytest.mark.parametrize("bucketsnap_run", SERVERS, indirect=True)
def test_the_run_env_points_an_unconfigured_script_at_the_server(
    bucketsnap_run: Run, uninterrupted: dict[str, Any]
) -> None:
    result = preempt(WORKER, bucketsnap_run, args=[bucketsnap_run.url], at=DuringSave(3), signal=signal.SIGKILL)
    assert result.committed_at_signal == (1, 3) and result.resumed.resumed_from == 3
    assert_same_state(result.store().load("last"), uninterrupted)


def test_sigkill_during_a_save_commits_nothing_of_it(bucketsnap_memory_run: Run, uninterrupted: dict[str, Any]) -> None:
    run = bucketsnap_memory_run
    result = preempt(WORKER, run, args=[run.url], at=DuringSave(2), signal=signal.SIGKILL)
    assert result.killed.returncode == -signal.SIGKILL
    assert result.killed.committed == result.committed_at_signal == (1,)
    assert (result.resumed.resumed_from, result.resumed.committed) == (1, (3, 5, 7))
    assert_same_state(result.store().load("last"), uninterrupted)


def test_sigterm_during_a_save_lets_on_preemption_finish_it(
    bucketsnap_local_run: Run, uninterrupted: dict[str, Any]
) -> None:
    run = bucketsnap_local_run
    result = preempt(WORKER, run, args=[run.url], at=DuringSave(2), signal=signal.SIGTERM)
    assert result.killed.returncode == -signal.SIGTERM
    assert result.committed_at_signal == (1,)
    assert result.killed.committed[:2] == (1, 3)  # the save under way, then maybe a final snapshot
    assert result.resumed.resumed_from == result.killed.committed[-1]
    assert_same_state(result.store().load("last"), uninterrupted)


def test_sigterm_from_a_background_save(bucketsnap_memory_run: Run, uninterrupted: dict[str, Any]) -> None:
    """The moment is reached on save_async's thread; on_preemption, in the main thread, writes the final one."""
    run = bucketsnap_memory_run
    result = preempt(WORKER, run, args=[run.url, "8", "2", "async"], at=AfterCommits(1), signal=signal.SIGTERM)
    assert result.killed.returncode == -signal.SIGTERM
    assert result.committed_at_signal == (1,) and result.killed.committed[0] == 1
    assert result.resumed.resumed_from == result.killed.committed[-1]
    assert_same_state(result.store().load("last"), uninterrupted)


def test_a_moment_that_never_comes_fails_the_test(bucketsnap_memory_run: Run) -> None:
    run = bucketsnap_memory_run
    with pytest.raises(AssertionError, match=r"(?s)ended before AfterCommits\(n=9\).*committed \[1, 3, 5, 7\]"):
        preempt(WORKER, run, args=[run.url], at=AfterCommits(9), signal=signal.SIGKILL)


def test_a_restart_that_fails_fails_the_test_with_its_traceback(bucketsnap_memory_run: Run) -> None:
    run = bucketsnap_memory_run
    with pytest.raises(
        AssertionError, match=r"(?s)restarted after SIGKILL, failed: exit status 1.*cannot resume from 3"
    ):
        preempt(
            WORKER,
            run,
            args=[run.url],
            at=AfterCommits(2),
            signal=signal.SIGKILL,
            env={"RESUMABLE_CRASH_ON_RESUME": "1"},
        )


def test_a_process_past_its_timeout_is_killed_with_what_it_started(tmp_path: Path) -> None:
    script = tmp_path / "hang.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '600'])\n"
        "open(sys.argv[1], 'w').write(f'{child.pid}')\n"
        "time.sleep(600)\n"
    )
    pid_file = tmp_path / "child.pid"
    run = Run("local", str(tmp_path / "run"))
    # 5 s: the script writes its child's pid within a second of starting, even on a loaded machine.
    with pytest.raises(AssertionError, match="still running after 5 s"):
        run_training(str(script), run, args=[str(pid_file)], timeout=5)
    child = int(pid_file.read_text())
    with pytest.raises(psutil.NoSuchProcess):
        if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:  # reaped by init soon
            raise psutil.NoSuchProcess(child)


def test_entry_points_as_a_module_and_as_a_function(bucketsnap_local_run: Run) -> None:
    run = bucketsnap_local_run
    first = run_training("resumable", run, args=[run.url, "4"], cwd=WORKERS)
    assert (first.resumed_from, first.committed) == (None, (1, 3))
    second = run_training("resumable:main", run, args=[run.url, "6"], cwd=WORKERS)
    assert (second.resumed_from, second.committed) == (3, (5,))


def test_moments_count_from_one() -> None:
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="counts from 1"):
            AfterCommits(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="counts from 1"):
            DuringSave(bad)  # type: ignore[arg-type]


def test_a_journal_record_cut_short_by_a_kill_is_dropped(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    journal.put("manifest/000000000001.json", b"{}")
    journal.delete("snapshots/old.zip")
    journal.put("snapshots/new.zip", b"x" * 1000)
    journal.close()
    raw = (tmp_path / "journal").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:-10])
    assert [(op, rel) for op, rel, _ in read_journal(tmp_path / "journal")] == [
        (b"P", "manifest/000000000001.json"),
        (b"D", "snapshots/old.zip"),
        (b"P", "snapshots/new.zip"),
    ]
    assert [rel for _, rel, _ in read_journal(tmp_path / "cut")] == ["manifest/000000000001.json", "snapshots/old.zip"]
    assert list(read_journal(tmp_path / "missing")) == []


def test_assert_same_state_names_the_first_difference() -> None:
    state = {
        "model": {"weight": torch.arange(6.0).reshape(2, 3), "nan": torch.tensor([math.nan])},
        "optim": {"state": {0: {"step": 3}}, "param_groups": [{"lr": 0.01}]},
        "rng": torch.get_rng_state(),
        "buffer": np.array([[1, 2], [3, 4]], dtype=np.uint8),
        "loss": math.nan,
    }
    copy = {**state, "model": {k: v.clone() for k, v in state["model"].items()}}
    assert_same_state(copy, state)
    weight = state["model"]["weight"].clone()
    weight[1, 2] += 1
    model, optim = state["model"], state["optim"]
    cases = [
        ({**state, "model": {**model, "weight": weight}}, r"state\['model'\]\['weight'\]: tensors differ \(1 of 6"),
        ({**state, "model": {**model, "weight": weight.double()}}, r"torch.float64\(2, 3\) instead of torch.float32"),
        ({**state, "optim": {**optim, "state": {0: {"step": 4}}}}, r"\['state'\]\[0\]\['step'\]: 4 instead of 3"),
        ({**state, "optim": {**optim, "param_groups": []}}, r"param_groups'\]: \[\] instead of"),
        ({k: v for k, v in state.items() if k != "rng"}, r"state: keys differ \(missing \[\"'rng'\"\]"),
        ({**state, "buffer": state["buffer"] + 1}, r"state\['buffer'\]: arrays differ \(4 of 4 differ"),
        ({**state, "loss": 1.0}, r"state\['loss'\]: 1.0 instead of nan"),
    ]
    for actual, message in cases:
        with pytest.raises(AssertionError, match=message):
            assert_same_state(actual, state)


def test_importing_bucketsnap_loads_no_testing_kit() -> None:
    code = (
        "import sys, bucketsnap; "
        "print([m for m in ('bucketsnap.testing', 'pytest', '_pytest', 'moto') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "[]"
