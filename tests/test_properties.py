"""Property-based tests: arbitrary nested states round-trip; interleaved writers never lose a commit."""

from __future__ import annotations

import io
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bucketsnap import SnapshotStore
from bucketsnap._manifest import Manifest
from bucketsnap._values import decode, encode
from helpers import assert_same

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int64, torch.bool]
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes)
    seed = draw(st.integers(0, 2**16))
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100).to(dtype)
    if draw(st.booleans()) and t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous
    return t


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray | np.generic:
    dtype = draw(st.sampled_from(["<f4", "<f8", "<i2", ">i4", "|u1", "|b1", "<c8"]))
    shape = tuple(draw(shapes))
    array = (np.arange(int(np.prod(shape)), dtype="<f8") * draw(st.floats(-5, 5))).astype(dtype).reshape(shape)
    return array[()] if draw(st.booleans()) and shape == () else array


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
keys = (
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.text(max_size=8)
    | st.tuples(st.integers(0, 3), st.text(max_size=3))
)
leaves = scalars | tensors() | arrays()
nested = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(keys, children, max_size=4)
        | st.dictionaries(st.text(max_size=6), children, max_size=4).map(OrderedDict)
    ),
    max_leaves=12,
)
states = st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True), nested, min_size=1, max_size=4)


def round_trip(value: Any) -> Any:
    encoded = encode(value)
    return decode(io.BytesIO(b"".join(bytes(c) for c in encoded.chunks())), where="test")


@SETTINGS
@given(nested)
def test_values_round_trip(value: Any) -> None:
    assert_same(round_trip(value), value)


@SETTINGS
@given(nested)
def test_copy_encoding_is_independent_of_later_changes(value: Any) -> None:
    encoded = encode(value, copy=True)
    payload = b"".join(bytes(c) for c in encoded.chunks())
    assert payload == b"".join(bytes(c) for c in encode(value).chunks())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states)
def test_states_round_trip_through_a_store(state: dict[str, Any]) -> None:
    store = SnapshotStore(f"memory://props-{uuid.uuid4().hex[:8]}/run")
    store.save(1, state)
    assert_same(store.load(1), state)
    key = next(iter(state))
    assert_same(store.load(1, keys=[key]), {key: state[key]})
    store.verify(1)


# -- the manifest merge: interleaved writers ------------------------------------------------------------------

ops = st.lists(
    st.tuples(
        st.integers(0, 2),  # which writer
        st.sampled_from(["save", "delete"]),
        st.integers(0, 6),  # itr
        st.none() | st.tuples(st.integers(0, 2), st.integers(0, 6)),  # another writer commits in the middle
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_interleaved_writers_never_lose_a_commit(sequence: list[tuple[int, str, int, Any]]) -> None:
    """Each writer's commit may race with another's; the final manifest is what a serial history gives."""
    url = f"memory://merge-{uuid.uuid4().hex[:8]}/run"
    writers = [SnapshotStore(url) for _ in range(3)]
    model: dict[int, int] = {}  # itr -> value saved last
    for step, (w, op, itr, sneak) in enumerate(sequence):
        store = writers[w]
        original = store._log.commit_state  # saves and deletes both commit through it
        state = {"calls": 0}

        def racing(
            change: Any,
            *,
            _orig: Any = original,
            _sneak: Any = sneak,
            _state: Any = state,
            _step: int = step,
            **kw: Any,
        ) -> Manifest:
            def change_once(current: Manifest) -> Any:
                _state["calls"] += 1
                if _state["calls"] == 1 and _sneak is not None:
                    other, other_itr = _sneak
                    writers[other].save(other_itr, {"v": 1000 + _step}, overwrite=True)
                    model[other_itr] = 1000 + _step
                return change(current)

            return _orig(change_once, **kw)

        store._log.commit_state = racing  # type: ignore[method-assign]
        try:
            if op == "save":
                store.save(itr, {"v": step}, overwrite=True)
                model[itr] = step
            elif itr in model:
                store.delete(itr)
                model.pop(itr, None)
        finally:
            store._log.commit_state = original  # type: ignore[method-assign]
    final = SnapshotStore(url)
    assert final.itrs() == sorted(model)
    for itr, value in model.items():
        assert final.load(itr) == {"v": value}
    assert sum(w.conflicts for w in writers) >= sum(1 for s in sequence if s[3] is not None and s[1] == "save")
