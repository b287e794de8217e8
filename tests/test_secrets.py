"""Safe loading and secrets: a snapshot from an untrusted bucket runs no code; credentials never leak.

A planted secret (in storage options and in URL user info) is grepped for in exception messages, reprs, the
DEBUG log, what is stored in the run (manifest, meta.json, archives) and the CLI's output.
"""

from __future__ import annotations

import ast
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from fsspec.implementations.memory import MemoryFileSystem

from bucketsnap import BucketsnapError, SnapshotStore, UnsafeLoadError
from bucketsnap._cli import cli
from conftest import Backend

SECRET = "Sup3rS3cretValue9f4a"
SRC = Path(__file__).resolve().parents[1] / "src" / "bucketsnap"


class WritesAFile:
    """Unpickling this runs code: it creates the file named by ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (Path(self.path), "pwned"))


# -- safe loading ------------------------------------------------------------------------------------------


def test_a_payload_that_runs_code_is_never_unpickled_without_allow_pickle(tmp_path: Path, backend: Backend) -> None:
    marker = tmp_path / "pwned"
    store = backend.store("pickle")
    info = store.save(1, {"evil": {"obj": WritesAFile(str(marker))}, "policy": torch.ones(2)})
    assert info.members["evil"].pickled
    for attempt in (
        lambda: store.load(1),
        lambda: store.load(1, keys=["evil"]),
        lambda: store.open(1)["evil"],
        lambda: dict(store.open(1)),
    ):
        with pytest.raises(UnsafeLoadError, match="allow_pickle=True"):
            attempt()
        assert not marker.exists()
    store.verify(1)  # verification reads every byte but decodes nothing
    assert torch.equal(store.load(1, keys=["policy"])["policy"], torch.ones(2))
    assert not marker.exists()
    store.load(1, keys=["evil"], allow_pickle=True)  # the opt-in really would run it
    assert marker.read_text() == "pwned"


def test_a_manifest_that_hides_the_pickled_flag_still_cannot_unpickle(tmp_path: Path, memory_backend: Backend) -> None:
    marker = tmp_path / "pwned"
    store = memory_backend.store("hidden")
    store.save(1, {"evil": WritesAFile(str(marker))})
    fs, gen = store.storage.fs, store._log.generations()[-1]
    doc = json.loads(store.storage.read(f"manifest/{gen:012d}.json"))
    doc["snapshots"][0]["members"]["evil"]["pickled"] = False  # a hostile bucket lies about it
    doc["generation"] = gen + 1
    fs.pipe_file(store.storage.path(f"manifest/{gen + 1:012d}.json"), json.dumps(doc).encode())
    with pytest.raises(UnsafeLoadError):
        store.load(1)
    assert not marker.exists()


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    return ast.unparse(call.func)


#: torch.load calls on bytes this very process made, never on bytes read from a store: (file, function).
#: bucketsnap.dcp's writer gets DCP's non-tensor values already torch.saved by DCP's planner, and decodes them
#: to store them with bucketsnap's codecs (docs/dcp.md).
LOCAL_TORCH_LOADS = {("_dcp_format.py", "encode_bytes_item")}


def _enclosing_function(tree: ast.AST, node: ast.AST) -> str:
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(n is node for n in ast.walk(f)):
            return f.name
    return ""


def test_unpickling_is_confined_and_torch_load_is_weights_only() -> None:
    """bucketsnap never calls torch.load except with weights_only=True, and unpickles in known places only."""
    unpickle_sites = set()
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for call in _calls(tree):
            name = _name(call)
            if name == "torch.load":
                weights_only = [k for k in call.keywords if k.arg == "weights_only"]
                site = (path.relative_to(SRC).as_posix(), _enclosing_function(tree, call))
                if site in LOCAL_TORCH_LOADS:
                    continue
                assert weights_only and ast.unparse(weights_only[0].value) == "True", f"{path}:{call.lineno}"
            if name.split(".")[-1] in ("loads", "load", "Unpickler") and name.split(".")[0] in (
                "pickle",
                "cloudpickle",
            ):
                unpickle_sites.add(path.relative_to(SRC).as_posix())
    # _values.py and the SB3 readers unpickle only behind allow_pickle=True (tested above and in the SB3 tests);
    # _distributed_save.py unpickles exceptions sent by the job's own ranks, never bytes from the bucket.
    allowed = {"_values.py", "integrations/sb3.py", "integrations/_sb3_data.py", "_distributed_save.py"}
    assert unpickle_sites <= allowed, unpickle_sites


# -- secrets ---------------------------------------------------------------------------------------------------


def _everything_stored(store: SnapshotStore) -> bytes:
    root = store.storage.root
    return b"".join(
        bytes(v.getbuffer()) if hasattr(v, "getbuffer") else bytes(v)
        for k, v in MemoryFileSystem.store.items()
        if k.startswith(root)
    )


def _our_log(caplog: pytest.LogCaptureFixture) -> str:
    """bucketsnap's own records (fsspec's DEBUG log prints its paths, user info of a memory:// URL included)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("bucketsnap"))


def _exception_text(exc: BaseException) -> str:
    return f"{exc}\n{exc!r}\n{exc.args!r}"


def test_a_secret_in_the_url_never_leaks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"memory://AKIAEXAMPLE:{SECRET}@bucket/run"
    store = SnapshotStore(url)
    info = store.save(1, {"policy": torch.ones(3)}, metrics={"r": 1.0})
    texts = [repr(store), store.url, repr(info), info.url, repr(store.open(1)), repr(store.storage)]
    for failing in (lambda: store.load(2), lambda: store.load(1, keys=["nope"]), lambda: store.delete(7)):
        with pytest.raises((BucketsnapError, KeyError)) as exc:
            failing()
        texts.append(_exception_text(exc.value))
    store.storage.delete(info.path)  # a missing archive: the error names the URL
    with pytest.raises(BucketsnapError) as missing:
        store.load(1)
    texts.append(_exception_text(missing.value))
    texts.append(_our_log(caplog))
    assert caplog.records, "DEBUG logging was on"
    assert "***@bucket" in store.url
    leaks = [t for t in texts if SECRET in t]
    assert not leaks, leaks
    assert SECRET.encode() not in _everything_stored(store).replace(b"\n", b"")


def test_a_secret_in_storage_options_never_leaks(s3_backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    options = {**s3_backend.options, "secret": SECRET}  # LocalStack accepts any secret
    store = SnapshotStore(s3_backend.url("secret"), storage_options=options)
    info = store.save(1, {"policy": torch.ones(3)}, metrics={"r": 1.0})
    store.verify(1)
    texts = [repr(store), repr(info), repr(store.open(1)), repr(store.storage), _our_log(caplog)]
    stored = b"".join(store.storage.read(f"manifest/{g:012d}.json") for g in store._log.generations())
    stored += store.storage.read(info.path)
    bad = SnapshotStore(s3_backend.url("secret").replace("s3://", "s3://no-such-bucket-"), storage_options=options)
    for failing in (lambda: store.load(5), bad.itrs, lambda: bad.save(1, {"x": 1})):
        try:
            failing()
        except Exception as exc:  # whatever the backend says, the secret is not in it
            texts.append(_exception_text(exc))
    assert SECRET not in "\n".join(texts)
    assert SECRET.encode() not in stored


def test_the_cli_never_prints_a_secret(s3_backend: Backend) -> None:
    url = s3_backend.url("cli")
    options = {**s3_backend.options, "secret": SECRET}
    store = SnapshotStore(url, storage_options=options)
    store.save(3, {"policy": torch.ones(2)}, metrics={"r": 2.0})
    endpoint = s3_backend.options["client_kwargs"]["endpoint_url"]
    common = [
        "--endpoint-url", endpoint,
        "--storage-option", f"key={s3_backend.options['key']}",
        "--storage-option", f"secret={SECRET}",
        "--storage-option", "config_kwargs.s3.addressing_style=path",
    ]  # fmt: skip
    runner = CliRunner()
    outputs = []
    for args in (
        ["ls", url],
        ["show", url, "--json"],
        ["verify", url],
        ["ls", url + "-missing"],
        ["show", url, "--itr", "9"],
    ):
        result = runner.invoke(cli, [args[0], *common, "--debug", *args[1:]], env={"AWS_SECRET_ACCESS_KEY": SECRET})
        outputs.append(result.output + (result.stderr if result.stderr_bytes is not None else ""))
    assert "000000000003" in outputs[0] or " 3 " in outputs[0], outputs[0]
    leaks = [o for o in outputs if SECRET in o]
    assert not leaks, leaks


def test_environment_credentials_do_not_leak_into_metadata(memory_backend: Backend, monkeypatch: Any) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    store = memory_backend.store("env")
    store.save(1, {"x": torch.zeros(1)}, metrics={"a": 1})
    assert SECRET.encode() not in _everything_stored(store)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET
