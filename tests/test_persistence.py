"""tianshou-style persistence: events, groups, PolicyPersistence in both modes, on memory and S3."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import pytest
import torch

from bucketsnap import KeepBest, SnapshotNotFoundError, SnapshotStore, UnsafeLoadError
from bucketsnap.persistence import (
    Persistence,
    PersistenceGroup,
    PersistEvent,
    PolicyPersistence,
    RestoreEvent,
    StateDictPersistence,
    World,
)
from conftest import Backend

Mode = PolicyPersistence.Mode


@pytest.fixture(params=["memory", "s3"])
def mem_or_s3(request: pytest.FixtureRequest) -> Backend:
    if request.param == "s3":
        request.applymarker(pytest.mark.s3)
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


class Policy(torch.nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
        self.scale = scale

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs) * self.scale  # type: ignore[no-any-return]


class Recorder(Persistence):
    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        self.name = name
        self.log = log

    def persist(self, event: PersistEvent, world: World) -> None:
        self.log.append((self.name, event.value))
        world.members[f"{self.name}_marker"] = self.name

    def restore(self, event: RestoreEvent, world: World) -> None:
        assert world.snapshot is not None
        self.log.append((self.name, event.value))


def world(backend: Backend, policy: torch.nn.Module | None = None, **kwargs: object) -> World:
    return World(backend.url("tianshou"), policy, storage_options=backend.options, **kwargs)  # type: ignore[arg-type]


def test_events_and_abstract_base() -> None:
    assert PersistEvent.PERSIST_POLICY.value == "persist_policy"
    assert RestoreEvent.RESTORE_POLICY.value == "restore_policy"
    assert Mode.POLICY.value == "policy" and Mode.POLICY_STATE_DICT.value == "policy_state_dict"
    assert PolicyPersistence().mode is Mode.POLICY  # tianshou's default
    with pytest.raises(TypeError):
        Persistence()  # type: ignore[abstract]


def test_group_applies_in_order_and_persists_nothing_when_disabled() -> None:
    log: list[tuple[str, str]] = []
    w = World("memory://persistence/group")
    group = PersistenceGroup(Recorder("a", log), Recorder("b", log))
    group.persist(PersistEvent.PERSIST_POLICY, w)
    assert log == [("a", "persist_policy"), ("b", "persist_policy")]
    assert list(w.members) == ["a_marker", "b_marker"]
    log.clear()
    disabled = PersistenceGroup(Recorder("a", log), enabled=False)
    disabled.persist(PersistEvent.PERSIST_POLICY, w)
    assert log == []
    w.store.save(0, {"x": 1})
    w.open_snapshot()
    disabled.restore(RestoreEvent.RESTORE_POLICY, w)  # restoring always runs, as in tianshou
    assert log == [("a", "restore_policy")]


def test_state_dict_mode_round_trip_without_pickle(mem_or_s3: Backend) -> None:
    policy = Policy()
    w = world(mem_or_s3, policy)
    info = PolicyPersistence(mode=Mode.POLICY_STATE_DICT).persist(policy, w)
    assert info is not None and info.itr == 0 and info.keys() == ["policy_state_dict"]
    assert not info.members["policy_state_dict"].pickled
    fresh = Policy()
    restored = PolicyPersistence(mode=Mode.POLICY_STATE_DICT).restore(fresh, world_at(w))
    assert restored is fresh and torch.equal(fresh.net.weight, policy.net.weight)
    with pytest.raises(ValueError, match="structurally equal"):
        PolicyPersistence(mode=Mode.POLICY_STATE_DICT).restore(None, world_at(w))


def world_at(w: World) -> World:
    """A second world on the same run, as a separate process would build."""
    return World(w.store, itr=w.itr)


def test_policy_mode_restores_without_constructing_and_needs_consent(mem_or_s3: Backend) -> None:
    policy = Policy(scale=3.0)
    w = world(mem_or_s3, policy)
    info = PolicyPersistence().persist(policy, w)
    assert info is not None and info.members["policy"].pickled
    with pytest.raises(UnsafeLoadError, match="allow_pickle"):
        PolicyPersistence().restore(None, world_at(w))
    w2 = world_at(w)
    loaded = PolicyPersistence().restore(None, w2, allow_pickle=True)
    assert isinstance(loaded, Policy) and loaded.scale == 3.0 and w2.policy is loaded
    obs = torch.randn(5, 4)
    assert torch.equal(loaded(obs), policy(obs))
    into = Policy()
    PolicyPersistence().restore(into, world_at(w), allow_pickle=True)  # weights into an existing policy
    assert torch.equal(into.net.weight, policy.net.weight)


def test_disabled_persistence_skips_persisting_but_restores(mem_or_s3: Backend) -> None:
    policy = Policy()
    w = world(mem_or_s3, policy)
    disabled = PolicyPersistence(enabled=False, mode=Mode.POLICY_STATE_DICT)
    assert disabled.persist(policy, w) is None
    assert w.store.itrs() == []
    with pytest.raises(SnapshotNotFoundError):
        disabled.restore(Policy(), w)
    PolicyPersistence(mode=Mode.POLICY_STATE_DICT).persist(policy, w)
    fresh = disabled.restore(Policy(), world_at(w))
    assert torch.equal(fresh.net.weight, policy.net.weight)


def test_additional_persistence_shares_the_snapshot(mem_or_s3: Backend) -> None:
    log: list[tuple[str, str]] = []
    normaliser = torch.nn.BatchNorm1d(4)
    normaliser.train()
    normaliser(torch.randn(16, 4) * 5 + 2)
    extra = PersistenceGroup(StateDictPersistence("obs_norm", normaliser), Recorder("rec", log))
    persistence = PolicyPersistence(extra, mode=Mode.POLICY_STATE_DICT)
    policy = Policy()
    w = world(mem_or_s3, policy)
    info = persistence.persist(policy, w)
    assert info is not None and info.keys() == ["policy_state_dict", "obs_norm", "rec_marker"]
    assert w.store.itrs() == [0]  # one snapshot for the policy and what goes with it
    fresh_norm = torch.nn.BatchNorm1d(4)
    restore_extra = PersistenceGroup(StateDictPersistence("obs_norm", fresh_norm), Recorder("rec", log))
    PolicyPersistence(restore_extra, mode=Mode.POLICY_STATE_DICT).restore(Policy(), world_at(w))
    assert torch.equal(fresh_norm.running_mean, normaliser.running_mean)
    assert log == [("rec", "persist_policy"), ("rec", "restore_policy")]


def test_itrs_advance_explicit_itr_replaces_and_restore_picks_an_itr(mem_or_s3: Backend) -> None:
    persistence = PolicyPersistence(mode=Mode.POLICY_STATE_DICT)
    policy = Policy()
    w = world(mem_or_s3, policy)
    save_best = persistence.get_save_best_fn(w)
    weights = []
    for _ in range(3):
        with torch.no_grad():
            policy.net.weight.add_(1.0)
        weights.append(policy.net.weight.clone())
        save_best(policy)
    assert w.store.itrs() == [0, 1, 2]
    w.itr = 1
    with torch.no_grad():
        policy.net.weight.zero_()
    persistence.persist(policy, w)  # an explicit itr is replaced
    assert w.store.itrs() == [0, 1, 2]
    assert torch.equal(persistence.restore(Policy(), World(w.store, itr=1)).net.weight, torch.zeros(2, 4))
    assert torch.equal(persistence.restore(Policy(), World(w.store)).net.weight, weights[2])
    assert torch.equal(persistence.restore(Policy(), World(w.store, itr=0)).net.weight, weights[0])


def test_restoring_in_the_other_mode_says_so() -> None:
    policy = Policy()
    w = World("memory://persistence/modes", policy)
    PolicyPersistence(mode=Mode.POLICY_STATE_DICT).persist(policy, w)
    with pytest.raises(ValueError, match="persisted in another mode"):
        PolicyPersistence(mode=Mode.POLICY).restore(None, world_at(w), allow_pickle=True)
    # Into an existing policy the weights are all Mode.POLICY needs, and they are there.
    fresh = PolicyPersistence(mode=Mode.POLICY).restore(Policy(), world_at(w))
    assert torch.equal(fresh.net.weight, policy.net.weight)


def test_policy_mode_restores_into_a_policy_without_pickle(mem_or_s3: Backend) -> None:
    policy = Policy(scale=2.0)
    w = world(mem_or_s3, policy)
    info = PolicyPersistence().persist(policy, w)
    assert info is not None and info.keys() == ["policy", "policy_state_dict"]
    assert info.members["policy"].pickled and not info.members["policy_state_dict"].pickled
    fresh = PolicyPersistence().restore(Policy(), world_at(w))  # no allow_pickle: nothing is unpickled
    assert torch.equal(fresh.net.weight, policy.net.weight)


@dataclass(kw_only=True)
class TianshouLikeWorld:
    """tianshou.highlevel.world.World's fields and methods, without importing tianshou."""

    algorithm: Any = None
    persist_directory: str
    restore_directory: str | None = None
    envs: Any = None
    logger: Any = None
    trainer: Any = None

    def persist_path(self, filename: str) -> str:
        return f"{self.persist_directory}/{filename}"

    def restore_path(self, filename: str) -> str:
        assert self.restore_directory is not None
        return f"{self.restore_directory}/{filename}"


class TianshouMode(Enum):
    """tianshou's own PolicyPersistence.Mode, which its Experiment passes."""

    POLICY_STATE_DICT = "policy_state_dict"
    POLICY = "policy"


class PathWriter(Persistence):
    """A tianshou-native persistence: it writes beside the run through world.persist_path."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def persist(self, event: PersistEvent, world: World) -> None:
        self.paths.append(world.persist_path("extra.bin"))

    def restore(self, event: RestoreEvent, world: World) -> None:
        self.paths.append(world.restore_path("extra.bin") if world.restore_directory else "resumed in place")


def test_tianshous_calling_conventions_and_world(mem_or_s3: Backend) -> None:
    """tianshou's Experiment builds PolicyPersistence(additional, enabled=..., mode=<its Mode>), calls
    get_save_best_fn(world) / get_save_checkpoint_fn(world) with its World and restore(policy, world, device)."""
    url = mem_or_s3.url("tianshou-world")
    policy = Policy()
    writer = PathWriter()
    persistence = PolicyPersistence(
        PersistenceGroup(StateDictPersistence("obs_norm", torch.nn.BatchNorm1d(4)), writer),
        enabled=True,
        mode=TianshouMode.POLICY_STATE_DICT,
        storage_options=mem_or_s3.options,
    )
    assert persistence.mode is Mode.POLICY_STATE_DICT
    ts_world = TianshouLikeWorld(algorithm=policy, persist_directory=url)
    persistence.get_save_best_fn(ts_world)(policy)
    checkpoint_fn = persistence.get_save_checkpoint_fn(ts_world)
    assert checkpoint_fn is not None
    best_weight = policy.net.weight.detach().clone()
    with torch.no_grad():
        policy.net.weight.add_(1.0)
    assert checkpoint_fn(3, 300, 12).startswith(url.split("://")[0])
    store = SnapshotStore(url, storage_options=mem_or_s3.options)
    assert [i.keys() for i in store.infos()] == [
        ["policy_state_dict", "obs_norm"],
        ["policy_state_dict", "trainer", "obs_norm"],
    ]
    assert store.load(1, keys=["trainer"])["trainer"] == {"epoch": 3, "env_step": 300, "gradient_step": 12}
    assert writer.paths == [f"{url}/extra.bin"] * 2  # tianshou's own handlers still see tianshou's world

    # restore(policy, world, device), positionally: the newest *policy* snapshot (tianshou's policy.pt), not the
    # checkpoint, from the world's restore_directory.
    fresh = Policy()
    restore_world = TianshouLikeWorld(persist_directory="unused", restore_directory=url)
    PolicyPersistence(
        PersistenceGroup(writer), mode=TianshouMode.POLICY_STATE_DICT, storage_options=mem_or_s3.options
    ).restore(fresh, restore_world, "cpu")
    assert torch.equal(fresh.net.weight, best_weight)
    assert writer.paths[-1] == f"{url}/extra.bin"
    resumed = Policy()
    counters = persistence.restore_checkpoint(resumed, TianshouLikeWorld(persist_directory=url))
    assert counters == {"epoch": 3, "env_step": 300, "gradient_step": 12}
    assert torch.equal(resumed.net.weight, policy.net.weight)


def test_the_run_comes_from_the_persistence_or_the_world() -> None:
    policy = Policy()
    bound = PolicyPersistence(mode=Mode.POLICY_STATE_DICT, location="memory://persistence/bound")
    bound.persist(policy, TianshouLikeWorld(persist_directory="memory://persistence/ignored"))
    assert SnapshotStore("memory://persistence/bound").itrs() == [0]
    assert SnapshotStore("memory://persistence/ignored").itrs() == []
    bound.restore(Policy(), TianshouLikeWorld(persist_directory="x"))  # no restore_directory: its own run
    with pytest.raises(ValueError, match="policy_restore_directory"):
        PolicyPersistence().restore(Policy(), TianshouLikeWorld(persist_directory="x"))
    with pytest.raises(TypeError, match="tianshou's World"):
        PolicyPersistence().persist(policy, object())


def test_checkpoints_disabled_absent_and_the_newest_policy() -> None:
    assert PolicyPersistence(enabled=False).get_save_checkpoint_fn(World("memory://persistence/off")) is None
    policy = Policy()
    w = World("memory://persistence/ckpt", policy)
    persistence = PolicyPersistence(mode=Mode.POLICY_STATE_DICT)
    assert persistence.restore_checkpoint(Policy(), w) is None  # nothing to resume: a first start
    checkpoint_fn = persistence.get_save_checkpoint_fn(w)
    assert checkpoint_fn is not None
    checkpoint_fn(1, 10, 1)  # a run of checkpoints only: restore takes the newest checkpoint
    without = PolicyPersistence().get_save_checkpoint_fn(TianshouLikeWorld(persist_directory="memory://persistence/x"))
    assert without is not None
    with pytest.raises(ValueError, match="no algorithm"):
        without(1, 10, 1)
    assert torch.equal(persistence.restore(Policy(), World(w.store)).net.weight, policy.net.weight)


def test_state_dict_persistence_with_tianshous_own_policy_persistence() -> None:
    """Given by Environments.set_persistence, it is called by tianshou's PolicyPersistence with tianshou's World:
    it commits its own snapshot (to its location, else persist_directory) and restores from restore_directory."""
    norm = torch.nn.BatchNorm1d(4)
    norm.running_mean.fill_(2.0)
    handler = StateDictPersistence("obs_norm", norm)
    handler.persist(PersistEvent.PERSIST_POLICY, TianshouLikeWorld(persist_directory="memory://persistence/env"))
    assert SnapshotStore("memory://persistence/env").info().keys() == ["obs_norm"]
    fresh = torch.nn.BatchNorm1d(4)
    StateDictPersistence("obs_norm", fresh).restore(
        RestoreEvent.RESTORE_POLICY,
        TianshouLikeWorld(persist_directory="new", restore_directory="memory://persistence/env"),
    )
    assert torch.equal(fresh.running_mean, norm.running_mean)
    elsewhere = StateDictPersistence("obs_norm", norm, location="memory://persistence/elsewhere")
    elsewhere.persist(PersistEvent.PERSIST_POLICY, TianshouLikeWorld(persist_directory="memory://persistence/env"))
    assert SnapshotStore("memory://persistence/elsewhere").itrs() == [0]
    with pytest.raises(SnapshotNotFoundError, match="holds 'other'"):
        StateDictPersistence("other", fresh).restore(
            RestoreEvent.RESTORE_POLICY,
            TianshouLikeWorld(persist_directory="x", restore_directory="memory://persistence/env"),
        )


def test_best_policies_with_metrics_and_retention() -> None:
    store = SnapshotStore("memory://persistence/best", retention=KeepBest(1, "return"))
    persistence = PolicyPersistence(mode=Mode.POLICY_STATE_DICT)
    policy = Policy()
    for ret in (1.0, 5.0, 2.0):
        persistence.persist(policy, World(store, policy, metrics={"return": ret}))
    assert store.itrs() == [1, 2]  # the best (itr 1) and, always, the newest
    assert store.info(1).metrics == {"return": 5.0}
