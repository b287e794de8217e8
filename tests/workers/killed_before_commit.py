"""A writer killed between storing its archive and committing it (a preempted VM), for the repair tests.

Usage: killed_before_commit.py URL OPTIONS_JSON ITR VALUE. Saves ``{"v": VALUE}`` as itr ITR with
``overwrite=True`` and metrics ``{"v": VALUE}``; once its archive is stored, just as the save would commit it,
the process sends itself SIGKILL. It prints ``stored <path>`` first, so the test knows which archive it left.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from bucketsnap import SnapshotStore
from bucketsnap._commit import Committer


def main() -> None:
    url, options, itr, value = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def killed(self: Committer, info: Any, base: Any, **kwargs: Any) -> None:
        assert self.storage.exists(info.path), "the archive is stored before its commit"
        print(f"stored {info.path}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    Committer.commit = killed  # type: ignore[method-assign,assignment]
    SnapshotStore(url, storage_options=options).save(itr, {"v": value}, metrics={"v": value}, overwrite=True)
    print("committed (the kill never came)", flush=True)


if __name__ == "__main__":
    main()
