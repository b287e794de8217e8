"""The ``bucketsnap`` command line: every command on memory (in-process), local disk and the S3 test server.

Most calls go through click's CliRunner (memory:// is per process, so it can only be tested in-process); the
installed console script is run as a subprocess for a smoke test on local disk and on S3, and for the secret
test.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from bucketsnap import BucketsnapError, SnapshotStore
from bucketsnap._cli import EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_USAGE, cli
from bucketsnap._info import SnapshotInfo
from bucketsnap._progress import progress_bar
from conftest import Backend

SCRIPT = Path(sys.executable).parent / "bucketsnap"
SECRET = "PLANTED-s3cr3t-9f8e7d"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=120)


def s3_args(backend: Backend) -> list[str]:
    """The S3 test server's storage options as command-line options."""
    client = backend.options["client_kwargs"]
    return [
        "--endpoint-url",
        client["endpoint_url"],
        "-s",
        f"key={backend.options['key']}",
        "-s",
        f"secret={backend.options['secret']}",
        "-s",
        f"client_kwargs.region_name={client['region_name']}",
        "-s",
        "config_kwargs=" + json.dumps(backend.options["config_kwargs"]),
    ]


def seed(store: SnapshotStore) -> torch.nn.Module:
    """Three snapshots (itr 10, 20, 30) of a small policy, its optimizer, a compressible buffer and a counter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for itr in (10, 20, 30):
        state = {"policy": model.state_dict(), "optimizer": optimizer.state_dict(), "frames": torch.zeros(20_000)}
        store.save(itr, {**state, "step": itr}, metrics={"return": itr * 1.5})
    return model


def flip_byte(store: SnapshotStore, itr: int, key: str) -> None:
    info = store.info(itr)
    data = bytearray(store.storage.read(info.path))
    data[info.members[key].offset + 20] ^= 0x40
    store.storage.fs.pipe_file(store.storage.path(info.path), bytes(data))


# -- ls and show ---------------------------------------------------------------------------------------------


def test_ls_and_show_as_tables_and_json(memory_backend: Backend) -> None:
    store = memory_backend.store()
    seed(store)
    out = invoke("ls", store.url)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0].split()[:2] == ["ITR", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == ["10", "20", "30"]
    assert "policy,optimizer,frames,step" in lines[1] and "return=45" in lines[3]

    listed = json.loads(invoke("ls", store.url, "--json").stdout)
    assert [s["itr"] for s in listed] == [10, 20, 30]
    assert listed[0]["url"] == store.info(10).url

    shown = invoke("show", store.url, "--itr", "first")
    assert shown.exit_code == 0 and "itr       10" in shown.stdout
    frames = next(line for line in shown.stdout.splitlines() if line.startswith("frames"))
    assert float(frames.split()[5]) > 100, "a zero buffer compresses several hundred times"
    doc = json.loads(invoke("show", store.url, "--json").stdout)
    assert doc["itr"] == 30 and doc["members"]["frames"]["ratio"] > 100
    assert doc["members"]["policy"]["raw_size"] == store.info().members["policy"].raw_size


def test_lookup_and_usage_errors_have_their_exit_codes(memory_backend: Backend) -> None:
    store = memory_backend.store()
    missing = invoke("ls", f"{memory_backend.base}/no-such-run")
    assert missing.exit_code == EXIT_NOT_FOUND
    assert missing.stderr.startswith("bucketsnap: error: no bucketsnap run at") and "Traceback" not in missing.output
    seed(store)
    unknown = invoke("show", store.url, "--itr", "99")
    assert unknown.exit_code == EXIT_NOT_FOUND and "itr 99" in unknown.stderr and "10, 20, 30" in unknown.stderr
    no_key = invoke("restore", store.url, "--key", "critic", "-o", "critic.pt")
    assert no_key.exit_code == EXIT_NOT_FOUND and "no key 'critic'" in no_key.stderr
    for args in (
        ["show", store.url, "--itr", "latest"],
        ["verify", store.url, "--itr", "10", "--all"],
        ["ls", store.url, "-s", "no-equals-sign"],
        ["restore", store.url, "-o", "policy.txt"],
        ["nonsense"],
    ):
        result = invoke(*args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)


# -- verify --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["memory", "local", pytest.param("s3", marks=pytest.mark.s3)])
def test_verify_names_the_corrupt_member_and_exits_1(name: str, request: pytest.FixtureRequest) -> None:
    backend: Backend = request.getfixturevalue(f"{name}_backend")
    store = backend.store()
    seed(store)
    extra = s3_args(backend) if name == "s3" else []
    assert invoke("verify", store.url, *extra).exit_code == 0
    flip_byte(store, 20, "policy")
    result = invoke("verify", store.url, "--all", *extra)
    assert result.exit_code == EXIT_FAILURE
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "itr 20" in failed[0] and "policy.zst" in failed[0], result.stdout
    assert result.stdout.count("ok ") == 2
    assert "1 of 3 snapshots failed verification: itr 20" in result.stderr
    assert invoke("verify", store.url, "--itr", "30", *extra).exit_code == 0


# -- restore -------------------------------------------------------------------------------------------------


def test_restore_writes_files_torch_and_safetensors_read(memory_backend: Backend, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    store = memory_backend.store()
    model = seed(store)
    store.save(40, {"agent": {"actor": model.state_dict(), "critic": [torch.ones(2), torch.zeros(3)]}})

    out = tmp_path / "policy.safetensors"
    result = invoke("restore", store.url, "--itr", "30", "--key", "policy", "-o", str(out))
    assert result.exit_code == 0, result.output
    tensors = load_file(out)
    assert tensors.keys() == model.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())

    nested = tmp_path / "agent.safetensors"
    assert invoke("restore", store.url, "--key", "agent", "-o", str(nested)).exit_code == 0
    assert {"actor.0.weight", "actor.1.num_batches_tracked", "critic.0", "critic.1"} <= set(load_file(nested))

    refused = invoke("restore", store.url, "--itr", "10", "-k", "optimizer", "-o", str(tmp_path / "o.safetensors"))
    assert refused.exit_code == EXIT_FAILURE
    assert "'param_groups.0.lr'" in refused.stderr and ".pt" in refused.stderr
    assert not (tmp_path / "o.safetensors").exists()

    pt = tmp_path / "optimizer.pt"
    assert invoke("restore", store.url, "--itr", "10", "-k", "optimizer", "-o", str(pt)).exit_code == 0
    assert torch.load(pt, weights_only=True) == store.load(10, keys=["optimizer"])["optimizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.safetensors", "optimizer.pt", "policy.safetensors"]


# -- cp ------------------------------------------------------------------------------------------------------


def test_cp_copies_commits_and_refuses_to_clobber(memory_backend: Backend) -> None:
    source = memory_backend.store("src")
    seed(source)
    dest_url = memory_backend.url("dst")
    result = invoke("cp", source.url, dest_url, "--all")
    assert result.exit_code == 0, result.output
    dest = SnapshotStore(dest_url)
    assert dest.itrs() == [10, 20, 30]
    assert {i.path for i in dest.infos()}.isdisjoint(i.path for i in source.infos()), "new unique names"
    assert [dest.info(i).metrics for i in (10, 30)] == [source.info(i).metrics for i in (10, 30)]
    assert invoke("verify", dest_url, "--all").exit_code == 0

    again = invoke("cp", source.url, dest_url, "--itr", "20")
    assert again.exit_code == EXIT_FAILURE and "itr 20 already committed" in again.stderr
    assert invoke("cp", source.url, dest_url, "--all", "--skip-existing").stdout.count("skipped") == 3
    replaced = dest.info(20).path
    assert invoke("cp", source.url, dest_url, "--itr", "20", "--overwrite").exit_code == 0
    assert dest.info(20).path != replaced and not dest.storage.exists(replaced)

    flip_byte(source, 30, "policy")
    corrupt = invoke("cp", source.url, memory_backend.url("dst2"))
    assert corrupt.exit_code == EXIT_FAILURE and "policy.zst" in corrupt.stderr and "checksum" in corrupt.stderr
    assert invoke("cp", f"{memory_backend.base}/nothing-here", dest_url).exit_code == EXIT_NOT_FOUND


def test_copy_from_brings_member_objects_and_refs(memory_backend: Backend) -> None:
    source = memory_backend.store("src")
    rank1 = source.save(1, {"shard": torch.arange(10)})
    source.storage.fs.pipe_file(source.storage.path("chunks/abc123"), b"chunk bytes")
    main = source.save(2, {"policy": torch.ones(3)})
    # A multi-object snapshot, as a distributed save commits one: a member in another archive, plus a ref.
    shard = dict(rank1.members)["shard"]
    members = {**main.members, "shard": dataclasses.replace(shard, path=rank1.path)}
    multi = SnapshotInfo(2, main.path, main.url, main.size, main.created, {}, members, refs=("chunks/abc123",))
    source._log.commit(lambda m: [s for s in m.snapshots if s.itr != 2 and s.itr != 1] + [multi])
    dest = memory_backend.store("dst")
    seen: list[tuple[int, int]] = []
    copied = dest.copy_from(source, 2, progress=lambda done, total: seen.append((done, total)))
    assert copied.members["shard"].path not in (None, rank1.path)
    assert dest.storage.read("chunks/abc123") == b"chunk bytes"
    assert torch.equal(dest.load(2)["shard"], torch.arange(10)) and dest.verify(2)
    total = main.size + rank1.size + len(b"chunk bytes")
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert dest.gc(min_age=0) == [], "every copied object is referenced"


# -- gc and repair -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_gc_removes_a_crash_orphan_and_keeps_every_committed_snapshot(
    name: str, request: pytest.FixtureRequest
) -> None:
    backend: Backend = request.getfixturevalue(f"{name}_backend")
    store = backend.store()
    seed(store)
    extra = s3_args(backend) if name == "s3" else []
    orphan = "snapshots/000000000040-deadbeefdeadbeef.zip"
    store.storage.fs.pipe_file(store.storage.path(orphan), b"PK\x03\x04 half an upload")
    fresh = invoke("gc", store.url, *extra)
    assert fresh.exit_code == 0 and fresh.stdout == "", "a fresh object may be a concurrent writer's"
    dry = invoke("gc", store.url, "--dry-run", "--min-age", "0", *extra)
    assert dry.stdout.splitlines() == [f"would remove {orphan}"] and store.storage.exists(orphan)
    done = invoke("gc", store.url, "--min-age", "0", *extra)
    assert done.exit_code == 0 and done.stdout.splitlines() == [f"removed {orphan}"]
    assert not store.storage.exists(orphan)
    assert store.itrs() == [10, 20, 30]
    assert invoke("verify", store.url, "--all", *extra).exit_code == 0


def test_repair_after_a_corrupt_manifest(memory_backend: Backend) -> None:
    store = memory_backend.store()
    seed(store)
    newest = store.storage.list("manifest")[-1]
    store.storage.fs.pipe_file(store.storage.path(f"manifest/{newest}"), b"{garbage")
    broken = invoke("ls", store.url)
    assert broken.exit_code == EXIT_FAILURE and "bucketsnap repair" in broken.stderr
    repaired = invoke("repair", store.url)
    assert repaired.exit_code == 0 and "3 snapshots: 10, 20, 30" in repaired.stdout
    assert invoke("ls", store.url).exit_code == 0
    assert invoke("repair", f"{memory_backend.base}/typo").exit_code == EXIT_NOT_FOUND
    assert not SnapshotStore(f"{memory_backend.base}/typo").storage.list("manifest"), "repair created nothing"


def test_repair_of_a_healthy_run_says_so_and_commits_nothing(memory_backend: Backend) -> None:
    """A snapshot retention dropped (its archive left to gc) and an archive never committed stay invisible."""
    from bucketsnap import KeepLast
    from bucketsnap._saving import prepare

    store = memory_backend.store(retention=KeepLast(2))
    seed(store)
    store._stage(prepare(40, {"v": 40}, None, overwrite=False, copy=False))  # a save that never committed
    generations = store.storage.list("manifest")
    repaired = invoke("repair", store.url)
    assert repaired.exit_code == 0, repaired.stderr
    assert repaired.stdout.splitlines() == [f"nothing to repair: manifest generation {store._log.generations()[-1]} "
                                            "reads, with 2 snapshots: 20, 30"]  # fmt: skip
    assert store.storage.list("manifest") == generations and store.itrs() == [20, 30]
    empty = memory_backend.store("archives-only")
    empty.storage.fs.pipe_file(empty.storage.path(store.info(30).path), store.storage.read(store.info(30).path))
    alone = invoke("repair", empty.url)  # archives without a manifest: a first save in flight, or a lost manifest
    assert alone.exit_code == 0 and "1 archive but no manifest generation" in alone.stdout and empty.itrs() == []
    alone = invoke("repair", empty.url, "--from-archives")  # the manifest was lost: rebuilt
    assert alone.exit_code == 0 and alone.stdout.startswith("committed manifest generation 1 with 1 snapshot: 30")
    assert empty.itrs() == [30] and set(empty.load(30)) == set(store.load(30))


# -- secrets, errors, progress, logging ---------------------------------------------------------------------


def test_secret_looking_options_are_scrubbed_from_errors_and_tracebacks(
    memory_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = memory_backend.store()
    seed(store)

    def leaky(self: Any) -> Any:
        raise BucketsnapError(f"backend said: bad signature for secret {SECRET}")

    monkeypatch.setattr(SnapshotStore, "infos", leaky)
    for debug in ([], ["--debug"]):
        result = invoke("ls", store.url, "-s", f"secret={SECRET}", "-s", "anon=false", *debug)
        assert result.exit_code == EXIT_FAILURE
        assert SECRET not in result.output and "secret ***" in result.stderr
        assert ("Traceback" in result.stderr) == bool(debug)


@pytest.mark.s3
def test_console_script_on_s3_with_environment_credentials(s3_backend: Backend, tmp_path: Path) -> None:
    store = s3_backend.store()
    model = seed(store)
    client = s3_backend.options["client_kwargs"]
    env = {
        "AWS_ACCESS_KEY_ID": s3_backend.options["key"],
        "AWS_SECRET_ACCESS_KEY": s3_backend.options["secret"],
        "AWS_DEFAULT_REGION": client["region_name"],
        "BUCKETSNAP_ENDPOINT_URL": client["endpoint_url"],
    }
    path_style = ["-s", "config_kwargs=" + json.dumps(s3_backend.options["config_kwargs"])]
    out = tmp_path / "policy.pt"
    result = run_script("restore", store.url, "--key", "policy", "-o", str(out), *path_style, env=env)
    assert result.returncode == 0, result.stderr
    assert "%|" not in result.stderr and "B/s" not in result.stderr, "no progress bar when stderr is not a terminal"
    # Read back by torch alone, in a process where bucketsnap cannot even be imported.
    check = (
        "import sys, torch; sys.modules['bucketsnap'] = None; print(sorted(torch.load(sys.argv[1], weights_only=True)))"
    )
    loaded = subprocess.run([sys.executable, "-c", check, str(out)], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == str(sorted(model.state_dict()))

    planted = run_script("ls", store.url, "--json", "--debug", *path_style, "-s", f"token={SECRET}", env=env)
    assert planted.returncode == 0, planted.stderr
    assert SECRET not in planted.stdout + planted.stderr
    key = ["-s", f"key={s3_backend.options['key']}", "-s", f"secret={SECRET}"]
    missing = run_script("ls", f"{s3_backend.base}/no-run", *key, *path_style, env=env)
    assert missing.returncode == EXIT_NOT_FOUND and SECRET not in missing.stdout + missing.stderr

    local = tmp_path / "copy"
    copied = run_script("cp", store.url, str(local), "--all", *path_style, env=env)
    assert copied.returncode == 0, copied.stderr
    assert SnapshotStore(str(local)).itrs() == [10, 20, 30]


def test_console_script_smoke_on_local_disk(local_backend: Backend) -> None:
    store = local_backend.store()
    seed(store)
    version = run_script("--version")
    assert version.returncode == 0 and version.stdout.startswith("bucketsnap, version ")
    listed = run_script("ls", store.url)
    assert listed.returncode == 0 and "return=45" in listed.stdout
    missing = run_script("show", store.url, "--itr", "7")
    assert missing.returncode == EXIT_NOT_FOUND and missing.stderr.count("\n") == 1, missing.stderr


@pytest.mark.parametrize("command", ["ls", "show", "verify", "restore", "cp", "gc", "repair"])
def test_every_command_has_help(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Exit codes" in result.stdout and "--storage-option" in result.stdout


def test_progress_bar_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    with progress_bar("copy", file=io.StringIO()) as callback:
        assert callback is None
    tty = Tty()
    with progress_bar("copy itr 3", file=tty) as callback:
        assert callback is not None
        callback(0, 4 * 2**20)
        callback(4 * 2**20, 4 * 2**20)
    assert "copy itr 3" in tty.getvalue() and "4.00M" in tty.getvalue() and "B/s" in tty.getvalue()


def test_library_progress_callbacks_reach_the_total(memory_backend: Backend) -> None:
    store = memory_backend.store()
    calls: dict[str, list[tuple[int, int]]] = {"save": [], "load": [], "verify": []}
    info = store.save(1, {"w": torch.randn(3 * 2**20 // 4), "n": 1}, progress=lambda *a: calls["save"].append(a))
    store.load(1, keys=["w"], progress=lambda *a: calls["load"].append(a))
    store.verify(1, progress=lambda *a: calls["verify"].append(a))
    for name, seen in calls.items():
        dones = [d for d, _ in seen]
        assert dones == sorted(dones) and len(seen) >= 2, name
        assert seen[-1][0] == seen[-1][1] > 0, name
    assert calls["load"][-1][1] == info.members["w"].stored_size


def test_import_needs_no_cli_dependencies_and_adds_no_log_handler() -> None:
    code = (
        "import logging, sys, bucketsnap; "
        "early = [m for m in ('click', 'safetensors') if m in sys.modules]; "  # not tqdm: torch imports it
        "import bucketsnap._cli, bucketsnap._progress, bucketsnap._export, bucketsnap._copying; "
        "log = logging.getLogger('bucketsnap'); "
        "print(early, log.handlers, log.propagate, log.level, logging.getLogger().handlers)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "[]", "True", "0", "[]"]


# -- a new user's first commands (issue 16) -----------------------------------------------------------------


def test_ls_of_a_folder_lists_the_runs_in_it(local_backend: Backend) -> None:
    folder = Path(local_backend.base) / "runs"
    first, second = SnapshotStore(str(folder / "ppo")), SnapshotStore(str(folder / "sac"))
    seed(first)
    second.save(7, {"step": 7})
    (folder / "notes.txt").write_text("not a run")
    (folder / "empty").mkdir()
    listed = invoke("ls", str(folder))
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["RUN", "SNAPSHOTS", "LAST", "ITR", "LAST", "WRITE", "(UTC)"]
    assert [line.split()[:3] for line in lines[1:]] == [[first.url, "3", "30"], [second.url, "1", "7"]]
    assert "holds 2 runs" in listed.stderr
    runs = json.loads(invoke("ls", str(folder), "--json").stdout)
    assert [(r["url"], r["snapshots"], r["last_itr"]) for r in runs] == [(first.url, 3, 30), (second.url, 1, 7)]
    assert all(r["last_write"].endswith("+00:00") for r in runs)
    shown = invoke("show", str(folder))
    assert shown.exit_code == EXIT_NOT_FOUND and f"bucketsnap ls {folder}" in shown.stderr and first.url in shown.stderr


@pytest.mark.s3
def test_ls_of_a_bucket_prefix_lists_the_runs_under_it(s3_backend: Backend) -> None:
    prefix = s3_backend.url("prefix")
    for name in ("a", "b"):
        SnapshotStore(f"{prefix}/{name}", storage_options=s3_backend.options).save(1, {"step": 1})
    listed = invoke("ls", prefix, *s3_args(s3_backend))
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == [f"{prefix}/a", f"{prefix}/b"]


def test_a_file_given_as_the_run_is_not_a_run_and_names_its_run(local_backend: Backend, tmp_path: Path) -> None:
    store = local_backend.store()
    seed(store)
    archive = f"{store.url}/{store.info(20).path}"
    shown = invoke("show", archive)
    assert shown.exit_code == EXIT_NOT_FOUND
    assert f"the snapshot archive of itr 20 of the run at {store.url}" in shown.stderr
    assert f"bucketsnap show {store.url} --itr 20" in shown.stderr
    generation = store.storage.list("manifest")[-1]
    listed = invoke("ls", f"{store.url}/manifest/{generation}")
    assert listed.exit_code == EXIT_NOT_FOUND and f"of the run at {store.url}" in listed.stderr
    folder = invoke("verify", f"{store.url}/snapshots")
    assert folder.exit_code == EXIT_NOT_FOUND and f"snapshots/ folder of the run at {store.url}" in folder.stderr
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    plain = invoke("ls", str(other))
    assert plain.exit_code == EXIT_NOT_FOUND and "is a file, not a bucketsnap run" in plain.stderr
    for result in (shown, listed, folder, plain):
        assert result.stderr.count("\n") == 1 and "NotADirectoryError" not in result.stderr


@pytest.mark.parametrize(("typo", "meant"), [("s4", "s3"), ("memroy", "memory"), ("gss", "gs"), ("fiel", "file")])
def test_a_scheme_typo_suggests_the_nearest_protocol(typo: str, meant: str) -> None:
    result = invoke("ls", f"{typo}://bucket/run")
    assert result.exit_code == EXIT_FAILURE
    assert f"did you mean {meant}://?" in result.stderr and "install" not in result.stderr


def test_restore_to_a_missing_directory_fails_before_downloading(memory_backend: Backend) -> None:
    store = memory_backend.store()
    seed(store)
    for url, name in ((store.url, "x.pt"), (store.url, "x.safetensors"), (f"{memory_backend.base}/no-run", "x.pt")):
        result = invoke("restore", url, "--key", "policy", "-o", f"/no-such-dir/{name}")
        assert result.exit_code == EXIT_FAILURE
        expected = f"cannot write /no-such-dir/{name}: the directory /no-such-dir does not exist"
        assert result.stderr == f"bucketsnap: error: {expected}\n", "checked first, and no temp file named"


def test_restore_writes_a_bare_array_under_its_key_with_the_permissions_of_any_file(
    memory_backend: Backend, tmp_path: Path
) -> None:
    import numpy as np
    from safetensors.numpy import load_file

    store = memory_backend.store()
    rollouts = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.save(59, {"rollouts": rollouts, "policy": {"w": torch.ones(2)}, "step": 59})
    old = os.umask(0o027)
    try:
        st, pt = tmp_path / "r.safetensors", tmp_path / "r.pt"
        result = invoke("restore", store.url, "--key", "rollouts", "-o", str(st))
        assert result.exit_code == 0 and "1 tensor (safetensors)" in result.stdout, result.output
        assert invoke("restore", store.url, "--key", "rollouts", "-o", str(pt)).exit_code == 0
    finally:
        os.umask(old)
    assert list(load_file(st)) == ["rollouts"] and np.array_equal(load_file(st)["rollouts"], rollouts)
    assert st.stat().st_mode & 0o777 == pt.stat().st_mode & 0o777 == 0o640
    refused = invoke("restore", store.url, "--key", "step", "-o", str(tmp_path / "s.safetensors"))
    assert refused.exit_code == EXIT_FAILURE and "is an int," in refused.stderr


def test_a_whole_snapshot_pt_with_numpy_arrays_loads_with_weights_only(memory_backend: Backend, tmp_path: Path) -> None:
    import numpy as np

    store = memory_backend.store()
    frames = np.arange(6, dtype=np.uint8).reshape(2, 3)
    store.save(3, {"policy": {"w": torch.ones(2)}, "frames": frames, "scale": np.float32(0.5), "step": 3})
    out = tmp_path / "all.pt"
    result = invoke("restore", store.url, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote itr 3 to {out}: 2 tensors (1 from a numpy array) (torch.save)\n"
    loaded = torch.load(out, weights_only=True)
    assert torch.equal(loaded["frames"], torch.from_numpy(frames)) and loaded["scale"] == 0.5 and loaded["step"] == 3
    assert "note:" not in result.stderr


def test_a_pt_that_weights_only_refuses_says_so(memory_backend: Backend, tmp_path: Path) -> None:
    import datetime

    store = memory_backend.store()
    store.save(1, {"when": {"at": datetime.date(2026, 12, 1)}}, metrics={})
    result = invoke("restore", store.url, "--key", "when", "-o", str(tmp_path / "when.pt"), "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert "note: torch.load(" in result.stderr and "weights_only=False" in result.stderr


def test_gc_with_the_default_min_age_says_what_it_kept_and_why(local_backend: Backend) -> None:
    store = local_backend.store()
    seed(store)
    orphan = "snapshots/000000000040-deadbeefdeadbeef.zip"
    store.storage.fs.pipe_file(store.storage.path(orphan), b"PK\x03\x04 half an upload")
    dry = invoke("gc", store.url, "--dry-run")
    assert dry.stdout == "" and "would remove 0 objects; 3 committed snapshots kept" in dry.stderr
    assert "kept 1 object no snapshot needs: not condemned yet" in dry.stderr
    first = invoke("gc", store.url)
    assert first.stdout == "" and "removed 0 objects" in first.stderr
    assert "kept 1 object no snapshot needs: condemned 0 s ago, less than --min-age 3600 s" in first.stderr
    assert "--min-age 0" in first.stderr and store.storage.exists(orphan)
    done = invoke("gc", store.url, "--min-age", "0")
    assert done.stdout.splitlines() == [f"removed {orphan}"] and "removed 1 object;" in done.stderr
    assert "kept" not in done.stderr.replace("snapshots kept", "")


def test_the_connect_timeout_is_an_option_and_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "--connect-timeout" in invoke("ls", "--help").stdout
    seen: list[float] = []

    def remember(self: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(kwargs["retry"].connect_timeout)
        raise BucketsnapError("stop here")

    monkeypatch.setattr(SnapshotStore, "__init__", remember)
    invoke("ls", "memory://bucket/run", "--connect-timeout", "2.5")
    monkeypatch.setenv("BUCKETSNAP_CONNECT_TIMEOUT", "4")
    invoke("ls", "memory://bucket/run")
    assert seen == [2.5, 4.0]
    assert invoke("ls", "memory://bucket/run", "--connect-timeout", "0").exit_code == EXIT_USAGE
