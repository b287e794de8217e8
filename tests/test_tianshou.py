"""bucketsnap's persistence where tianshou 2.x calls its own, and bucketsnap.integrations.tianshou, on real
experiments (DQN off-policy, PPO on-policy, CartPole-v1, a few hundred steps) on memory:// and S3."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import Backend

# Before tianshou is imported: see tests/workers/tianshou_run.py (numba's compile takes 15-60 s per process here).
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")

import tianshou.highlevel.experiment as ts_experiment
from tianshou.highlevel.env import EnvFactoryRegistered, Environments, VectorEnvType
from tianshou.highlevel.persistence import PolicyPersistence as TianshouPolicyPersistence

from bucketsnap import SnapshotStore, UnsafeLoadError
from bucketsnap.integrations.tianshou import RunExperiment, keep_in_run
from bucketsnap.persistence import PolicyPersistence, StateDictPersistence
from workers.tianshou_run import build, greedy

Mode = TianshouPolicyPersistence.Mode
WORKER = str(Path(__file__).parent / "workers" / "tianshou_run.py")


def state(algorithm: Any) -> dict[str, Any]:
    return copy.deepcopy(algorithm.state_dict())


def assert_same_params(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Same tensors and the same optimizer states (tianshou's state dict holds them under ``_optimizers``)."""
    assert a.keys() == b.keys()
    for key in a:
        if key == "_optimizers":
            assert len(a[key]) == len(b[key])
            for x, y in zip(a[key], b[key], strict=True):
                assert x["param_groups"] == y["param_groups"]
                assert x["state"].keys() == y["state"].keys()
                for slot in x["state"]:
                    for name, value in x["state"][slot].items():
                        assert torch.equal(value, y["state"][slot][name]), (key, slot, name)
        else:
            assert torch.equal(a[key], b[key]), key


def restored(experiment: Any) -> Any:
    """The algorithm of a world built to restore, not to train."""
    return experiment.create_experiment_world().algorithm


@pytest.fixture
def swap_in_bucketsnap(monkeypatch: pytest.MonkeyPatch) -> None:
    """bucketsnap's PolicyPersistence where tianshou.highlevel.experiment uses its own."""
    monkeypatch.setattr(ts_experiment, "PolicyPersistence", PolicyPersistence)


def test_persistence_imports_no_tianshou() -> None:
    """bucketsnap.persistence stays framework-free: no import of tianshou anywhere in it, not even a lazy one."""
    import ast

    import bucketsnap.persistence

    tree = ast.parse(Path(bucketsnap.persistence.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.split(".")[0] == "tianshou"]


@pytest.mark.parametrize("algo", ["dqn", "ppo"])
def test_bucketsnap_policy_persistence_in_place_of_tianshous(
    algo: str, tmp_path: Path, swap_in_bucketsnap: None
) -> None:
    """tianshou builds bucketsnap's class, calls persist / get_save_best_fn / get_save_checkpoint_fn (PPO) and
    restore(policy, world, device) positionally with its own World: the run is tianshou's persist_directory."""
    result = build(algo, str(tmp_path)).run()
    run_dir = result.world.persist_directory
    store = SnapshotStore(run_dir)
    infos = store.infos()
    assert infos and all("policy_state_dict" in i.members and "policy" in i.members for i in infos)  # Mode.POLICY
    checkpoints = [i for i in infos if "trainer" in i.members]
    if algo == "ppo":  # tianshou hands on-policy trainers get_save_checkpoint_fn's function
        assert [store.load(i.itr, keys=["trainer"])["trainer"]["epoch"] for i in checkpoints] == [1, 2]
    else:
        assert checkpoints == []  # tianshou gives off-policy trainers no save_checkpoint_fn
    assert not list(Path(run_dir).glob("*.pt"))  # nothing of tianshou's own format
    newest_best = [i for i in infos if "trainer" not in i.members][-1]
    best = store.load(newest_best.itr, keys=["policy_state_dict"])["policy_state_dict"]
    again = restored(build(algo, str(tmp_path / "x"), train=False, policy_restore_directory=run_dir))
    assert_same_params(state(again), best)


class _Normaliser(torch.nn.Module):
    """Environment-specific state with a state dict (tianshou's examples persist observation statistics)."""

    def __init__(self, mean: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((4,), mean))


class _EnvFactory(EnvFactoryRegistered):
    """Registers a bucketsnap Persistence through tianshou's own hook, Environments.set_persistence."""

    def __init__(self, normaliser: _Normaliser, **kwargs: Any) -> None:
        super().__init__(task="CartPole-v1", venv_type=VectorEnvType.DUMMY)
        self.normaliser = normaliser
        self.persistence_kwargs = kwargs

    def create_envs(self, *args: Any, **kwargs: Any) -> Environments:
        envs = super().create_envs(*args, **kwargs)
        envs.set_persistence(StateDictPersistence("obs_norm", self.normaliser, **self.persistence_kwargs))
        return envs


@pytest.mark.parametrize("policy_persistence", ["tianshou", "bucketsnap"])
def test_bucketsnap_persistence_through_set_persistence(
    policy_persistence: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With tianshou's own PolicyPersistence the bucketsnap Persistence commits its own snapshots to the run in
    persist_directory; with bucketsnap's, its member joins the policy's snapshot. Both restore it."""
    # tianshou's own Mode.POLICY restore fails under torch >= 2.6 (torch.load's weights_only): its state dicts then
    mode = Mode.POLICY_STATE_DICT if policy_persistence == "tianshou" else Mode.POLICY
    if policy_persistence == "bucketsnap":
        monkeypatch.setattr(ts_experiment, "PolicyPersistence", PolicyPersistence)
    result = build("ppo", str(tmp_path), env_factory_=_EnvFactory(_Normaliser(3.0)), policy_persistence_mode=mode).run()
    run_dir = result.world.persist_directory
    infos = SnapshotStore(run_dir).infos()
    assert infos and all("obs_norm" in i.members for i in infos)
    if policy_persistence == "tianshou":
        assert all(list(i.members) == ["obs_norm"] for i in infos)
        assert list(Path(run_dir).glob("policy*.pt"))  # tianshou's own files, beside the run
    else:
        assert all({"policy_state_dict", "obs_norm"} <= set(i.members) for i in infos)
    fresh = _Normaliser(0.0)
    factory = _EnvFactory(fresh)
    restored(
        build(
            "ppo",
            str(tmp_path / "x"),
            env_factory_=factory,
            train=False,
            policy_restore_directory=run_dir,
            policy_persistence_mode=mode,
        )
    )
    assert torch.equal(fresh.mean, torch.full((4,), 3.0))


def test_set_persistence_with_a_location_commits_to_a_bucket(tmp_path: Path, s3_backend: Backend) -> None:
    url = s3_backend.url("obs-norm")
    build(
        "ppo",
        str(tmp_path),
        epochs=1,
        env_factory_=_EnvFactory(_Normaliser(2.0), location=url, storage_options=s3_backend.options),
    ).run()
    store = SnapshotStore(url, storage_options=s3_backend.options)
    assert store.itrs() and torch.equal(store.load("last")["obs_norm"]["mean"], torch.full((4,), 2.0))


@pytest.mark.parametrize(
    ("algo", "mode", "where"),
    [
        ("dqn", Mode.POLICY, "memory"),
        ("dqn", Mode.POLICY_STATE_DICT, "s3"),
        ("ppo", Mode.POLICY_STATE_DICT, "memory"),
        ("ppo", Mode.POLICY, "s3"),
    ],
)
@pytest.mark.filterwarnings("ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
def test_tianshou_and_bucketsnap_restore_the_same_policy(
    algo: str, mode: Any, where: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One training, each best policy persisted both by tianshou's own PolicyPersistence (policy.pt on local disk)
    and by keep_in_run (the bucketsnap run): restoring each through tianshou's Experiment with
    policy_restore_directory gives the same parameters and the same greedy actions, and no pickle is executed."""
    if where == "s3":
        request.applymarker(pytest.mark.s3)
    backend: Backend = request.getfixturevalue(f"{where}_backend")
    url = backend.url(algo)
    experiment = keep_in_run(
        build(algo, str(tmp_path), policy_persistence_mode=mode), url, storage_options=backend.options
    )
    world = experiment.create_experiment_world()
    assert world.trainer is not None
    theirs = TianshouPolicyPersistence(mode=mode)
    ours = world.trainer.params.save_best_fn
    bests: list[dict[str, Any]] = []

    def both(algorithm: Any) -> None:
        theirs.persist(algorithm, world)
        ours(algorithm)  # type: ignore[misc]
        bests.append(state(algorithm))

    world.trainer.params.save_best_fn = both
    world.trainer.run()
    assert bests
    store = SnapshotStore(url, storage_options=backend.options)
    assert store.infos()[-1].members["policy_state_dict"].pickled is False
    if mode is Mode.POLICY:
        assert store.infos()[0].members["policy"].pickled  # the whole object too, as tianshou's Mode.POLICY

    if mode is Mode.POLICY:  # tianshou's own torch.load refuses its whole-object file under torch >= 2.6 ...
        with pytest.raises(pickle.UnpicklingError, match="weights_only"):
            restored(
                build(
                    algo,
                    str(tmp_path / "a"),
                    train=False,
                    persistence_enabled=False,
                    policy_persistence_mode=mode,
                    policy_restore_directory=world.persist_directory,
                    seed=99,
                )
            )
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # ... unless told to unpickle: it is ours
    local = restored(
        build(
            algo,
            str(tmp_path / "a"),
            train=False,
            persistence_enabled=False,
            policy_persistence_mode=mode,
            policy_restore_directory=world.persist_directory,
            seed=99,  # other initial weights than the trained ones: equality below proves the restore
        )
    )
    from_run = restored(
        keep_in_run(
            build(
                algo,
                str(tmp_path / "b"),
                train=False,
                persistence_enabled=False,
                policy_persistence_mode=mode,
                policy_restore_directory=url,
                seed=99,
            ),
            url,
            storage_options=backend.options,
        )
    )
    assert_same_params(state(from_run), state(local))
    assert_same_params(state(from_run), bests[-1])
    np.testing.assert_array_equal(greedy(from_run), greedy(local))


def test_policy_mode_restores_the_whole_object_only_with_consent(tmp_path: Path) -> None:
    url = "memory://tianshou/whole"
    result = keep_in_run(build("dqn", str(tmp_path), epochs=1), url).run()
    persistence = PolicyPersistence(location=url)
    with pytest.raises(UnsafeLoadError, match="allow_pickle"):
        persistence.restore(None, result.world)
    whole = persistence.restore(None, result.world, allow_pickle=True)
    assert type(whole) is type(result.world.algorithm)
    np.testing.assert_array_equal(greedy(whole), greedy(result.world.algorithm))


def test_experiment_pickle_keeps_no_storage_options(tmp_path: Path) -> None:
    experiment = keep_in_run(build("dqn", str(tmp_path)), "memory://tianshou/p", storage_options={"key": "secret"})
    assert isinstance(experiment, RunExperiment)
    experiment.save(str(tmp_path))
    assert "secret" not in (tmp_path / "experiment.pkl").read_bytes().decode("latin-1")
    assert "secret" not in experiment.pprints()
    again = RunExperiment.from_directory(str(tmp_path), storage_options={"key": "given again"})
    assert isinstance(again, RunExperiment) and again.run_url == "memory://tianshou/p"
    assert again.storage_options == {"key": "given again"}
    assert again.config.policy_restore_directory == "memory://tianshou/p"  # the policy is in the run


@pytest.mark.parametrize(("algo", "where"), [("dqn", "s3"), ("ppo", "memory")])  # PPO on S3: the killed test
def test_an_interrupted_training_resumes_from_the_last_checkpoint(
    algo: str, where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Checkpoints (tianshou's save_checkpoint_fn, given to DQN too) reach the run; resume=True loads the newest
    into the algorithm (weights and optimizer) and the trainer goes on from its epoch and env step."""
    if where == "s3":
        request.applymarker(pytest.mark.s3)
    mem_or_s3: Backend = request.getfixturevalue(f"{where}_backend")
    url = mem_or_s3.url(algo)
    first = keep_in_run(build(algo, str(tmp_path / "1"), epochs=2), url, storage_options=mem_or_s3.options).run()
    store = SnapshotStore(url, storage_options=mem_or_s3.options)
    counters = [store.load(i.itr, keys=["trainer"])["trainer"] for i in store.infos() if "trainer" in i.members]
    assert [c["epoch"] for c in counters] == [1, 2] and counters[-1]["env_step"] == 200
    resumed = keep_in_run(
        build(algo, str(tmp_path / "2"), epochs=4), url, storage_options=mem_or_s3.options, resume=True
    )
    world = resumed.create_experiment_world()
    assert_same_params(state(world.algorithm), state(first.world.algorithm))  # the last checkpoint is the end state
    assert world.trainer is not None
    world.trainer.run()
    counters = [store.load(i.itr, keys=["trainer"])["trainer"] for i in store.infos() if "trainer" in i.members]
    assert [c["epoch"] for c in counters] == [1, 2, 3, 4]
    assert [c["env_step"] for c in counters] == [100, 200, 300, 400]
    assert counters[2]["gradient_step"] > counters[1]["gradient_step"]


def test_resume_without_a_checkpoint_starts_fresh(tmp_path: Path) -> None:
    url = "memory://tianshou/fresh"
    result = keep_in_run(build("ppo", str(tmp_path), epochs=1), url, resume=True).run()
    assert result.trainer_result is not None and result.trainer_result.train_step == 100


@pytest.fixture(scope="module", autouse=True)
def trainer_process() -> Iterator[subprocess.Popen[str]]:
    """The killed test's training process, started with the module so that its imports (tens of seconds on a
    loaded machine) overlap the other tests; it trains only once told the run."""
    proc = subprocess.Popen(
        [sys.executable, WORKER],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "NUMBA_DISABLE_JIT": "1"},
    )
    yield proc
    proc.kill()
    proc.wait()
    assert proc.stdin is not None
    proc.stdin.close()


def test_a_killed_training_resumes_from_last(
    tmp_path: Path, s3_backend: Backend, trainer_process: subprocess.Popen[str]
) -> None:
    """A real training process is SIGKILLed after its second checkpoint; the restarted job resumes from last."""
    url = s3_backend.url("killed")
    store = SnapshotStore(url, storage_options=s3_backend.options)
    assert trainer_process.stdin is not None
    trainer_process.stdin.write(json.dumps({"url": url, "options": s3_backend.options, "base": str(tmp_path / "1")}))
    trainer_process.stdin.write("\n")
    trainer_process.stdin.flush()
    try:
        while len([i for i in store.infos() if "trainer" in i.members]) < 2 and trainer_process.poll() is None:
            time.sleep(0.2)
    finally:
        trainer_process.kill()
        trainer_process.wait()
    checkpoints = [i for i in store.infos() if "trainer" in i.members]
    assert len(checkpoints) >= 2, "the training process died before its second checkpoint"
    saved = store.load(checkpoints[-1].itr, keys=["policy_state_dict", "trainer"])
    epoch = saved["trainer"]["epoch"]
    resumed = keep_in_run(
        build("ppo", str(tmp_path / "2"), epochs=epoch + 1), url, storage_options=s3_backend.options, resume=True
    )
    world = resumed.create_experiment_world()
    assert_same_params(state(world.algorithm), saved["policy_state_dict"])
    assert world.trainer is not None
    world.trainer.run()
    after = [store.load(i.itr, keys=["trainer"])["trainer"] for i in store.infos() if "trainer" in i.members]
    assert after[-1]["epoch"] == epoch + 1 and after[-1]["env_step"] == (epoch + 1) * 100
