"""IntervalTrigger (tf_agents semantics) and PolicySaveTrigger (policy variants, metrics, async saving)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bucketsnap import IntervalTrigger, PolicySaveTrigger, SnapshotStore, StorageError
from conftest import Backend


@pytest.fixture(params=["memory", "s3"])
def mem_or_s3(request: pytest.FixtureRequest) -> Backend:
    if request.param == "s3":
        request.applymarker(pytest.mark.s3)
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


# -- IntervalTrigger -------------------------------------------------------------------------------------------


def test_fires_when_the_interval_has_passed_since_the_last_firing() -> None:
    fired: list[int] = []
    trigger = IntervalTrigger(10, fired.append)
    for value in (0, 5, 9, 10, 11, 19, 23, 32, 33, 100):
        trigger(value)
    # 23 fires (>= 10 + 10); the next is due at 33, not 30: the value need not be a multiple of the interval
    assert fired == [10, 23, 33, 100]
    assert trigger.last_value == 100 and trigger.interval == 10


def test_start_sets_where_counting_begins() -> None:
    fired: list[int] = []
    trigger = IntervalTrigger(10, fired.append, start=100)
    for value in (0, 50, 105, 109, 110, 115, 120):
        trigger(value)
    assert fired == [110, 120]


@pytest.mark.parametrize("interval", [0, -1, -10])
def test_interval_zero_or_negative_never_fires_even_forced(interval: int) -> None:
    fired: list[int] = []
    trigger = IntervalTrigger(interval, fired.append)
    for value in (0, 1, 10, 1000):
        trigger(value)
        trigger(value, force_trigger=True)
    assert fired == []


def test_forcing_twice_at_the_same_value_fires_once() -> None:
    fired: list[int] = []
    trigger = IntervalTrigger(100, fired.append)
    trigger(0, force_trigger=True)  # the start value counts as the last one: nothing to force
    trigger(42, force_trigger=True)
    trigger(42, force_trigger=True)
    trigger(43, force_trigger=True)
    trigger(100)  # not 100 past 43 yet
    trigger(143)
    trigger(143, force_trigger=True)
    assert fired == [42, 43, 143]


def test_reset_and_set_start() -> None:
    fired: list[int] = []
    trigger = IntervalTrigger(10, fired.append, start=5)
    trigger(15)
    trigger.set_start(100)
    trigger(105)
    trigger(110)
    trigger.reset()  # back to the constructor's start (5), not set_start's
    trigger(15)
    assert fired == [15, 110, 15]


def test_a_firing_whose_fn_raises_does_not_count() -> None:
    calls: list[int] = []

    def flaky(value: int) -> None:
        calls.append(value)
        if len(calls) == 1:
            raise OSError("upload failed")

    trigger = IntervalTrigger(10, flaky)
    with pytest.raises(OSError, match="upload failed"):
        trigger(10)
    assert trigger.last_value == 0
    trigger(11)
    assert calls == [10, 11] and trigger.last_value == 11


# -- PolicySaveTrigger ------------------------------------------------------------------------------------------


class Metric:
    """A tf_agents-style metric: result() gives a scalar."""

    def __init__(self, value: float) -> None:
        self.value = value

    def result(self) -> torch.Tensor:
        return torch.tensor(self.value)


def policies() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"greedy": torch.nn.Linear(4, 2), "collect": torch.nn.Linear(4, 2), "raw": torch.nn.Linear(4, 3)}


def test_saves_each_variant_as_its_own_member(mem_or_s3: Backend) -> None:
    nets = policies()
    step = 0
    trigger = PolicySaveTrigger(
        mem_or_s3.url(),
        nets,
        lambda: step,
        100,
        metadata_metrics={"return": Metric(1.5)},
        storage_options=mem_or_s3.options,
    )
    for step in range(0, 260, 20):
        trigger(step)
    store = trigger.store
    assert store.itrs() == [100, 200]
    info = store.info()
    assert info.keys() == ["greedy", "collect", "raw"] and info.metrics == {"return": 1.5}
    assert not any(m.pickled for m in info.members.values())
    before = store.storage.bytes_read
    greedy = store.load(keys=["greedy"])
    assert list(greedy) == ["greedy"]
    assert store.storage.bytes_read - before < info.size  # only that member's range was downloaded
    fresh = torch.nn.Linear(4, 2)
    fresh.load_state_dict(greedy["greedy"])
    assert torch.equal(fresh.weight, nets["greedy"].weight)
    trigger.close()


@pytest.mark.parametrize(
    "train_step",
    [lambda: 30, torch.tensor(30), np.int64(30), torch.nn.Parameter(torch.tensor(30.0), requires_grad=False), 30],
    ids=["callable", "tensor", "numpy", "item", "int"],
)
def test_train_step_providers(train_step: Any) -> None:
    store = SnapshotStore("memory://triggers/steps")
    trigger = PolicySaveTrigger(store, {"policy": {"w": torch.ones(2)}}, train_step, 10)
    assert trigger.train_step() == 30
    trigger()  # the value defaults to the train step
    trigger(torch.tensor(45), force_trigger=True)  # an explicit value may be a tensor too
    assert store.itrs() == [30, 45]


def test_state_dict_providers_and_validation() -> None:
    class Provider:
        def state_dict(self) -> dict[str, Any]:
            return {"table": [1, 2, 3]}

    store = SnapshotStore("memory://triggers/providers")
    PolicySaveTrigger(store, {"q": Provider(), "plain": {"a": 1}}, 5, 1)(5)
    assert store.load() == {"q": {"table": [1, 2, 3]}, "plain": {"a": 1}}
    with pytest.raises(ValueError, match="non-empty"):
        PolicySaveTrigger(store, {}, 0, 1)
    with pytest.raises(TypeError, match="state_dict"):
        PolicySaveTrigger(store, {"p": 3}, 0, 1)


def test_forced_final_save_happens_once_and_interval_zero_never_saves(mem_or_s3: Backend) -> None:
    store = mem_or_s3.store()
    trigger = PolicySaveTrigger(store, {"greedy": torch.nn.Linear(2, 2)}, 0, 100)
    trigger(25, force_trigger=True)
    trigger(25, force_trigger=True)
    assert store.itrs() == [25]
    assert store.info().created == store.info(25).created  # one commit of 25, not two
    never = PolicySaveTrigger(mem_or_s3.store(), {"greedy": torch.nn.Linear(2, 2)}, 0, 0)
    never(1000, force_trigger=True)
    assert never.store.itrs() == []


def test_a_resumed_run_may_save_a_step_again() -> None:
    store = SnapshotStore("memory://triggers/resume")
    net = torch.nn.Linear(2, 2)
    PolicySaveTrigger(store, {"greedy": net}, 100, 100)(100)
    with torch.no_grad():
        net.weight.fill_(3.0)
    PolicySaveTrigger(store, {"greedy": net}, 100, 100)(100)  # restarted at the step it last saved
    assert store.itrs() == [100]
    assert torch.equal(store.load()["greedy"]["weight"], torch.full((2, 2), 3.0))


def test_async_copies_state_and_metrics_at_the_call(mem_or_s3: Backend) -> None:
    net = torch.nn.Linear(8, 8)
    metric = Metric(1.0)
    counter = {"episodes": 0}
    with PolicySaveTrigger(
        mem_or_s3.url(),
        {"greedy": net},
        10,
        10,
        async_saving=True,
        metadata_metrics={"return": metric, "episodes": lambda: counter["episodes"]},
        storage_options=mem_or_s3.options,
    ) as trigger:
        with torch.no_grad():
            net.weight.fill_(1.0)
        counter["episodes"] = 7
        trigger(10)
        with torch.no_grad():  # training goes on while the upload runs
            net.weight.fill_(2.0)
        metric.value = 99.0
        counter["episodes"] = 8
        store = trigger.store
    info = store.info()
    assert info.metrics == {"return": 1.0, "episodes": 7}
    assert torch.equal(store.load()["greedy"]["weight"], torch.full((8, 8), 1.0))


def test_async_keeps_at_most_one_save_in_flight() -> None:
    store = SnapshotStore("memory://triggers/bounded", max_in_flight=4)
    running, peak = 0, 0
    lock = threading.Lock()
    original = store._write

    def counting_write(*args: Any, **kwargs: Any) -> Any:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    store._write = counting_write  # type: ignore[method-assign]
    trigger = PolicySaveTrigger(store, {"w": {"w": torch.randn(50_000)}}, 0, 1, async_saving=True)
    for step in range(1, 7):
        trigger(step)
    trigger.flush()
    assert peak == 1
    assert store.itrs() == [1, 2, 3, 4, 5, 6]  # every fired step is saved: nothing is coalesced away
    trigger.close()


def failing_once(store: SnapshotStore) -> list[int]:
    """Make the store's next background write fail; return the list of attempted itrs."""
    attempts: list[int] = []
    original = store._write

    def write(prepared: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(prepared.itr)
        if len(attempts) == 1:
            raise StorageError(f"upload to {store.url} failed: connection reset")
        return original(prepared, *args, **kwargs)

    store._write = write  # type: ignore[method-assign]
    return attempts


def test_async_failure_is_raised_by_the_next_call_once() -> None:
    store = SnapshotStore("memory://triggers/fails")
    attempts = failing_once(store)
    trigger = PolicySaveTrigger(store, {"greedy": torch.nn.Linear(2, 2)}, 0, 10, async_saving=True)
    trigger(10)  # returns; the upload fails in the background
    trigger._settled.wait(60)
    with pytest.raises(StorageError, match="connection reset"):
        trigger(11)  # not due, but the error is raised anyway
    trigger(12)
    trigger(20)
    trigger.close()  # the error was raised once; nothing more to raise
    store.close()
    assert attempts == [10, 20] and store.itrs() == [20]


def test_async_failure_is_raised_by_the_next_firing_call() -> None:
    store = SnapshotStore("memory://triggers/fails-firing")
    failing_once(store)
    trigger = PolicySaveTrigger(store, {"greedy": torch.nn.Linear(2, 2)}, 0, 10, async_saving=True)
    trigger(10)
    with pytest.raises(StorageError, match="connection reset"):
        trigger(20)  # waits for the failed upload, then raises instead of saving
    trigger(20)  # the failed firing did not count: this one saves
    trigger.close()
    assert store.itrs() == [20]


def test_async_failure_is_raised_by_close_and_the_context_manager(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the run directory should be")
    trigger = PolicySaveTrigger(str(blocked), {"greedy": torch.nn.Linear(2, 2)}, 10, 10, async_saving=True)
    trigger(10)
    with pytest.raises(StorageError, match="blocked"):
        trigger.close()
    with (
        pytest.raises(StorageError, match="blocked"),
        PolicySaveTrigger(str(blocked), {"greedy": torch.nn.Linear(2, 2)}, 10, 10, async_saving=True) as trigger,
    ):
        trigger(10)
    sync = PolicySaveTrigger(str(blocked), {"greedy": torch.nn.Linear(2, 2)}, 10, 10)
    with pytest.raises(StorageError, match="blocked"):
        sync(10)  # without async_saving the call itself raises
