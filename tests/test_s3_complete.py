"""A multipart upload whose CompleteMultipartUpload response is lost (the server completed it): the retry gets
``NoSuchUpload``, and the save must see, from the object's multipart ETag, that its upload landed, instead of
failing a save whose archive is whole (found with a 10 GiB save against LocalStack)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import s3fs

from bucketsnap import StorageError

pytestmark = pytest.mark.s3
MiB = 2**20


def lose_the_first_response(monkeypatch: pytest.MonkeyPatch, *, apply: bool) -> list[str]:
    """The first CompleteMultipartUpload reaches the server and is applied (``apply``), or the upload is aborted
    instead (as a lifecycle rule would); either way its answer is lost to a connection reset."""
    calls: list[str] = []
    real = s3fs.S3FileSystem.call_s3

    def call_s3(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "complete_multipart_upload":
            calls.append(name)
            if len(calls) == 1:
                if apply:
                    real(self, name, *args, **kwargs)
                else:
                    upload = {k: kwargs[k] for k in ("Bucket", "Key", "UploadId")}
                    real(self, "abort_multipart_upload", **upload)
                raise ConnectionResetError("connection reset by peer (the test lost the response)")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", call_s3)
    return calls


def big_state() -> dict[str, Any]:
    return {"weights": np.random.default_rng(0).random(3 * MiB // 8 * 4)}  # 12 MiB, incompressible: 3 parts


def test_a_completed_upload_whose_answer_was_lost_is_a_saved_snapshot(
    s3_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = s3_backend.store(part_size=5 * MiB)
    calls = lose_the_first_response(monkeypatch, apply=True)
    store.save(1, big_state())
    assert len(calls) == 2, "the retry must have met the completed upload"
    assert store.itrs() == [1]
    store.verify(1)
    assert np.array_equal(store.load(1)["weights"], big_state()["weights"])


def test_an_upload_that_is_really_gone_still_fails(s3_backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = s3_backend.store(part_size=5 * MiB)
    calls = lose_the_first_response(monkeypatch, apply=False)
    with pytest.raises(StorageError, match="multipart upload is gone before it was completed"):
        store.save(1, big_state())
    assert len(calls) == 2
    assert store.itrs() == []
