"""A process forked after a restore restores on its own (found by review: the child's reads waited forever on
the read pool it inherited, whose threads were the parent's)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from bucketsnap import SnapshotStore
from conftest import Backend


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_child_forked_after_a_restore_restores_from_s3(s3_backend: Backend) -> None:
    store = s3_backend.store("fork")
    data = np.frombuffer(os.urandom(12 * 2**20), np.uint8)  # raw: several units, read on the pool
    store.save(1, {"x": data})
    assert np.array_equal(SnapshotStore(store.url, storage_options=s3_backend.options).load(1)["x"], data)
    pid = os.fork()
    if pid == 0:  # the child: a store of its own (fsspec's are not fork-safe), the same run
        ok = False
        try:
            ok = np.array_equal(SnapshotStore(store.url, storage_options=s3_backend.options).load(1)["x"], data)
        finally:
            os._exit(0 if ok else 1)  # never return into pytest in the child
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.2)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's restore did not finish in 120 s")
