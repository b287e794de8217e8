"""docs/preemption.md, "What happens on the signal", step 1: the handler "waits for save_async calls still
running, for at most half the deadline; ... one that is still running goes on beside the final save", and "The
deadline ... covers all three steps". A real process, a real SIGTERM, a save_async whose upload hangs."""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path

from bucketsnap import SnapshotStore
from helpers import Worker

DEADLINE = 4.0
STALL = 15.0  # far past the deadline: the in-flight upload never finishes before the process exits

SCRIPT = textwrap.dedent(
    f"""
    import sys
    import time

    from bucketsnap import SnapshotStore, on_preemption

    url, ready = sys.argv[1], sys.argv[2]
    store = SnapshotStore(url)
    store.save(0, {{"v": 0}})
    original = store._write
    calls = []


    def hanging_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the periodic save's upload hangs (a stalled link); the final save's does not
            time.sleep({STALL})
        return original(*args, **kwargs)


    store._write = hanging_write
    with on_preemption(store, lambda: {{"v": 2}}, itr_fn=lambda: 2, deadline={DEADLINE}):
        store.save_async(1, {{"v": 1}})
        open(ready, "w").close()
        while True:
            time.sleep(0.05)
    """
)


def test_a_hanging_save_async_does_not_keep_the_final_snapshot_from_committing_within_the_deadline(
    tmp_path: Path,
) -> None:
    script = tmp_path / "hanging_trainer.py"
    script.write_text(SCRIPT)
    url = str(tmp_path / "run")
    ready = tmp_path / "ready"
    worker = Worker(str(script), [url, str(ready)], tmp_path / "out.txt", tmp_path / "err.txt")
    try:
        give_up = time.monotonic() + 60
        while not ready.exists():
            assert worker.poll() is None, (tmp_path / "err.txt").read_text()
            assert time.monotonic() < give_up, "the worker never got ready"
            time.sleep(0.02)
        time.sleep(0.2)  # the save_async is in its hanging upload
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(STALL + 20)
        took = time.monotonic() - signalled
    finally:
        worker.kill()
    log = (tmp_path / "err.txt").read_text()
    assert code == -signal.SIGTERM, log
    assert took < DEADLINE + 2.0, f"exited {took:.1f} s after SIGTERM, deadline {DEADLINE} s\n{log}"
    store = SnapshotStore(url)
    assert 2 in store.itrs(), f"the final snapshot was not committed\n{log}"
    assert store.verify(2) and store.load(2) == {"v": 2}
