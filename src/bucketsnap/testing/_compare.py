"""``assert_same_state``: two training states exactly equal, or the first place where they differ."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["assert_same_state"]


def assert_same_state(actual: Any, expected: Any) -> None:
    """Assert that two states are exactly equal: nested mappings, lists and tuples of tensors, NumPy arrays and
    plain values (what a ``state_dict()``, an optimizer's state or ``torch.get_rng_state()`` is).

    Tensors and arrays must have the same dtype, shape and values (NaN equals NaN); mappings the same keys; plain
    values the same type and value.

    Raises:
        AssertionError: naming the first path that differs, such as ``state['optim']['state'][0]['exp_avg']``.
    """
    difference = _difference(actual, expected, "state")
    if difference is not None:
        raise AssertionError(difference)


def _difference(actual: Any, expected: Any, path: str) -> str | None:
    # Neither is imported here: a value can only be a tensor or an array if its library is already loaded.
    torch, numpy = sys.modules.get("torch"), sys.modules.get("numpy")
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            return f"{path}: a mapping was expected, not {type(actual).__name__}"
        missing, extra = set(expected) - set(actual), set(actual) - set(expected)
        if missing or extra:
            return f"{path}: keys differ (missing {sorted(map(repr, missing))}, unexpected {sorted(map(repr, extra))})"
        for key in expected:
            found = _difference(actual[key], expected[key], f"{path}[{key!r}]")
            if found is not None:
                return found
        return None
    if torch is not None and isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return f"{path}: a tensor was expected, not {type(actual).__name__}"
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            return f"{path}: {actual.dtype}{tuple(actual.shape)} instead of {expected.dtype}{tuple(expected.shape)}"
        a, e = actual.detach().cpu(), expected.detach().cpu()
        same = torch.equal(a, e) or (
            (a.is_floating_point() or a.is_complex()) and bool(torch.isclose(a, e, 0, 0, equal_nan=True).all())
        )
        return None if same else f"{path}: tensors differ ({_where(a.numpy(force=True), e.numpy(force=True))})"
    if numpy is not None and isinstance(expected, numpy.ndarray):
        if not isinstance(actual, numpy.ndarray):
            return f"{path}: an array was expected, not {type(actual).__name__}"
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            return f"{path}: {actual.dtype}{actual.shape} instead of {expected.dtype}{expected.shape}"
        try:
            same = bool(numpy.array_equal(actual, expected, equal_nan=True))
        except TypeError:  # equal_nan needs a numeric dtype
            same = bool(numpy.array_equal(actual, expected))
        return None if same else f"{path}: arrays differ ({_where(actual, expected)})"
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return f"{path}: {_short(actual)} instead of {_short(expected)}"
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            found = _difference(a, e, f"{path}[{index}]")
            if found is not None:
                return found
        return None
    if isinstance(expected, float) and isinstance(actual, float) and math.isnan(expected) and math.isnan(actual):
        return None
    if type(actual) is not type(expected) or actual != expected:
        return f"{path}: {_short(actual)} instead of {_short(expected)}"
    return None


def _where(actual: np.ndarray, expected: np.ndarray) -> str:
    import numpy as np

    try:
        differs = np.argwhere(~((actual == expected) | (np.isnan(actual) & np.isnan(expected))))
    except TypeError:  # isnan needs a numeric dtype
        differs = np.argwhere(actual != expected)
    if not len(differs):
        return "their bytes differ"
    first = tuple(int(i) for i in differs[0])
    found, wanted = actual[first].tolist(), expected[first].tolist()
    return f"{len(differs)} of {actual.size} differ, the first at {first}: {found!r} instead of {wanted!r}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
