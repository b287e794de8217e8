"""SB3's own zips read and written through bucketsnap's storage layer: retried, and its errors name the URL."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import fsspec
import pytest
import torch
from fsspec.spec import AbstractFileSystem

from bucketsnap import SnapshotNotFoundError, StorageError
from bucketsnap.integrations.sb3 import load_sb3_zip

SECRET = "s3cr3t-Kj4pQ"


class FlakyFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """``flaky://``: fsspec's memory store behind a connection that drops every ``every``-th request."""

    protocol = ("flaky",)
    root_marker = ""

    def __init__(self, every: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.every = every
        self.requests = 0
        self.target = fsspec.filesystem("memory")

    def _request(self) -> None:
        self.requests += 1
        if self.requests % self.every == 0:
            raise ConnectionResetError("connection reset by peer")

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        self._request()
        return self.target.info(path, **kwargs)  # type: ignore[no-any-return]

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        self._request()
        return self.target.cat_file(path, start=start, end=end, **kwargs)  # type: ignore[no-any-return]


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def _sb3_zip(url: str) -> dict[str, torch.Tensor]:
    """A zip laid out as SB3's ``model.save()`` writes one: JSON data, state dicts, a version stamp."""
    policy = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("data", json.dumps({"num_timesteps": 64, "gamma": 0.99}))
        with z.open("policy.pth", "w") as f:
            torch.save(policy, f)
        z.writestr("_stable_baselines3_version", "2.3.0")
    with fsspec.open(url, "wb") as f:
        f.write(buf.getvalue())
    return policy


def test_load_sb3_zip_retries_transient_errors() -> None:
    policy = _sb3_zip("memory://zips/model.zip")
    loaded = load_sb3_zip("flaky://zips/model.zip", storage_options={"every": 2})
    assert loaded.data == {"num_timesteps": 64, "gamma": 0.99} and loaded.sb3_version == "2.3.0"
    assert all(torch.equal(loaded.params["policy"][k], v) for k, v in policy.items())
    assert fsspec.filesystem("flaky", every=2).requests >= 10  # every other one failed and was retried


def test_load_sb3_zip_errors_are_bucketsnaps_and_name_the_url_without_credentials() -> None:
    _sb3_zip("memory://zips/model.zip")
    with pytest.raises(StorageError, match=r"flaky://zips/model\.zip failed 5 times"):
        load_sb3_zip("flaky://zips/model.zip", storage_options={"every": 1})
    with pytest.raises(SnapshotNotFoundError, match=r"no SB3 zip at memory://\*\*\*@zips/model\.zip") as exc:
        load_sb3_zip(f"memory://AKIA:{SECRET}@zips/model.zip")
    assert SECRET not in f"{exc.value}{exc.value!r}{exc.value.args}"
    with pytest.raises(StorageError, match=r"cannot open nosuchproto://zips/model\.zip"):
        load_sb3_zip("nosuchproto://zips/model.zip")


def test_load_sb3_zip_reads_an_object_at_the_root_of_a_filesystem() -> None:
    _sb3_zip("memory://model.zip")
    assert load_sb3_zip("memory://model.zip").data["num_timesteps"] == 64
