"""SB3's ``data`` entries (class parameters) encoded without pickle where a safe description exists.

SB3 cloudpickles every ``data`` entry that is not JSON: spaces, schedules, classes, ``deque``s, arrays. Most of
them have a plain description, and bucketsnap stores that instead, as tagged dicts (``{"$sb3": kind, ...}``):

==================  ==================================================================================
``class``           a class by import name, only one defined in stable_baselines3, sb3_contrib, torch.nn,
                    torch.optim or gymnasium, and only a ``torch.nn.Module``, optimizer, space, buffer,
                    action noise or enum (importing an installed library runs no code from the snapshot, and
                    no class that SB3 might call with the snapshot's arguments does anything but build one)
``space``           gymnasium ``Box``, ``Discrete``, ``MultiDiscrete``, ``MultiBinary``, ``Dict``, ``Tuple``, with
                    the state of the space's random generator (numpy's bit generators only)
``schedule``        SB3's ``FloatSchedule``, ``ConstantSchedule``, ``LinearSchedule``, and the closures of its
                    deprecated ``get_linear_fn``, ``constant_fn``, ``get_schedule_fn`` (rebuilt as those classes,
                    which compute the same expressions)
``train_freq``      ``TrainFreq(frequency, unit)``
``deque``           a ``deque`` with its ``maxlen``
``action_noise``    ``NormalActionNoise``, ``OrnsteinUhlenbeckActionNoise`` and ``VectorizedActionNoise`` of
                    them: class, constructor parameters and state (OU's previous noise), rebuilt by calling
                    the class
==================  ==================================================================================

``OrderedDict``s (a Dict observation space's ``_last_obs``) and torch tensors (ARS's ``weights``) are kept as
they are: the snapshot's value encoding stores both without pickle.

An entry with anything else inside (a user's lambda schedule, a custom class) is cloudpickled whole and kept as
bytes; it is unpickled only with ``allow_pickle=True``, unless ``custom_objects`` replaces it (SB3's semantics).

A schedule that is a closure (``learning_rate=lambda progress: ...``) has no description but its code. Without
``allow_pickle`` or a custom object, :func:`schedule_defaults` rebuilds ``learning_rate``, ``lr_schedule``,
``clip_range`` and ``clip_range_vf`` from the algorithm's own defaults (its ``__init__``'s), with a warning: the
model predicts exactly as saved, and training goes on with the default schedule unless one is given.
"""

from __future__ import annotations

import collections
import enum
import functools
import inspect
import sys
import types
import warnings
from typing import Any

import cloudpickle
import gymnasium
import numpy as np
import torch

from bucketsnap.errors import CorruptSnapshotError, UnsafeLoadError

__all__ = ["decode_entry", "encode_data", "resolve_data", "schedule_defaults"]

_TAG = "$sb3"
#: Where a class stored by name may come from: the module that defines it must be in one of these packages.
#: torch is limited to torch.nn and torch.optim (a name is data anyone who can write the bucket can edit, and
#: torch.hub, torch.fx, torch.package and the like load or compile code).
_IMPORTABLE = ("stable_baselines3.", "sb3_contrib.", "torch.nn.", "torch.optim.", "gymnasium.")


class _Unsafe(Exception):
    """The value has no safe description."""


def encode_data(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split SB3's data dict into safely described entries and cloudpickled ones (``{"type", "bytes"}``)."""
    safe: dict[str, Any] = {}
    pickled: dict[str, dict[str, Any]] = {}
    for name, value in data.items():
        try:
            safe[name] = _encode(value)
        except _Unsafe:
            pickled[name] = {"type": str(type(value)), "bytes": cloudpickle.dumps(value)}
    return safe, pickled


def resolve_data(
    safe: dict[str, Any],
    pickled: dict[str, dict[str, Any]],
    *,
    custom_objects: dict[str, Any] | None,
    allow_pickle: bool,
    where: str,
) -> dict[str, Any]:
    """Rebuild SB3's data dict: ``custom_objects`` win, pickled entries need ``allow_pickle``.

    Raises:
        UnsafeLoadError: a pickled entry is neither replaced by ``custom_objects`` nor allowed to unpickle.
    """
    custom = dict(custom_objects or {})
    out = {name: custom[name] if name in custom else decode_entry(value, where) for name, value in safe.items()}
    refused = []
    for name, entry in pickled.items():
        if name in custom:
            out[name] = custom[name]
        elif allow_pickle:
            out[name] = cloudpickle.loads(entry["bytes"])
        else:
            refused.append(f"{name} ({entry.get('type', '?')})")
    if refused:
        raise UnsafeLoadError(
            f"{where}: these SB3 data entries were cloudpickled: {', '.join(refused)}. Unpickling runs code from "
            "the snapshot: pass custom_objects={name: value} to replace them, or allow_pickle=True if you trust "
            "where the snapshot came from."
        )
    out.update({name: value for name, value in custom.items() if name not in out})
    for name in ("observation_space", "action_space"):
        if name in safe and name not in custom and not isinstance(out.get(name), gymnasium.spaces.Space):
            raise CorruptSnapshotError(f"{where}: SB3 data entry {name!r} is not a space: {str(safe[name])[:80]}")
    return out


#: schedule entries rebuilt from the algorithm's defaults when they were closures; lr_schedule from learning_rate
_SCHEDULES = {
    "learning_rate": "learning_rate",
    "lr_schedule": "learning_rate",
    "clip_range": "clip_range",
    "clip_range_vf": "clip_range_vf",
}


def schedule_defaults(
    cls: type, pickled: dict[str, Any], custom_objects: dict[str, Any] | None, where: str
) -> dict[str, Any]:
    """The schedules that were cloudpickled closures, rebuilt from ``cls``'s defaults; warns naming each.

    A schedule given in ``custom_objects`` wins, and ``lr_schedule`` follows a given ``learning_rate``. Returns
    custom objects to pass on to :func:`resolve_data`; entries ``cls`` has no default for are not returned (they
    stay refused without ``allow_pickle``).
    """
    from stable_baselines3.common.utils import FloatSchedule

    custom = custom_objects or {}
    defaults = {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    rebuilt: dict[str, Any] = {}
    from_defaults: dict[str, Any] = {}
    for name, source in _SCHEDULES.items():
        if name not in pickled or name in custom or (source not in defaults and source not in custom):
            continue
        value = custom[source] if source in custom else defaults[source]
        rebuilt[name] = FloatSchedule(value) if name == "lr_schedule" else value
        if source not in custom:
            from_defaults[source] = value
    if from_defaults:
        warnings.warn(
            f"{where}: the schedules {', '.join(rebuilt)} were closures, stored as cloudpickle and not unpickled; "
            f"rebuilt from {cls.__name__}'s defaults ({', '.join(f'{k}={v!r}' for k, v in from_defaults.items())}). "
            "Training goes on with these: pass custom_objects={name: schedule} to use yours, or allow_pickle=True "
            "if you trust where the snapshot came from.",
            stacklevel=3,
        )
    return rebuilt


def _encode(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str, bytes, np.ndarray, np.generic)):
        return v
    t = type(v)
    if t is list:
        return [_encode(x) for x in v]
    if t is tuple:
        return tuple(_encode(x) for x in v)
    if t is dict:
        if _TAG in v:
            raise _Unsafe
        return {k: _encode(x) for k, x in v.items()}
    if t is collections.OrderedDict:
        return collections.OrderedDict((k, _encode(x)) for k, x in v.items())
    if t is torch.Tensor or t is torch.nn.Parameter:
        return v
    if t is collections.deque:
        return {_TAG: "deque", "items": [_encode(x) for x in v], "maxlen": v.maxlen}
    if isinstance(v, gymnasium.spaces.Space):
        return _encode_space(v)
    module = getattr(t, "__module__", "")
    if module.startswith("stable_baselines3."):
        if t.__name__ == "TrainFreq":
            return {_TAG: "train_freq", "frequency": int(v.frequency), "unit": v.unit.value}
        if t.__name__ == "FloatSchedule":
            return {_TAG: "schedule", "kind": "float", "inner": _encode(v.value_schedule)}
        if t.__name__ == "ConstantSchedule" and isinstance(v.val, (int, float)):
            return {_TAG: "schedule", "kind": "constant", "val": v.val}
        if t.__name__ == "LinearSchedule":
            return {_TAG: "schedule", "kind": "linear", "start": v.start, "end": v.end, "end_fraction": v.end_fraction}
        if module == "stable_baselines3.common.noise":
            return _encode_noise(v)
    if type(v) is types.FunctionType and v.__module__ == "stable_baselines3.common.utils":
        schedule = _encode_schedule_closure(v)
        if schedule is not None:
            return schedule
    if isinstance(v, enum.Enum) and _safe_class(type(v)):  # HerReplayBuffer's GoalSelectionStrategy
        return {_TAG: "enum", "class": _class_name(type(v)), "value": _encode(v.value)}
    if isinstance(v, type):
        name = _class_name(v)
        if "<" not in name and _importable_as(name, v):
            return {_TAG: "class", "name": name}
    raise _Unsafe


def _encode_space(space: Any) -> dict[str, Any]:
    encoded = _encode_space_parameters(space)
    rng = getattr(space, "_np_random", None)  # sampled for off-policy warm-up actions: kept, as SB3's pickle does
    if type(rng) is np.random.Generator and type(rng.bit_generator).__name__ in _BIT_GENERATORS:
        encoded["rng"] = rng.bit_generator.state
    return encoded


#: numpy's bit generators, the only ones a space's random generator is rebuilt with
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def _encode_space_parameters(space: Any) -> dict[str, Any]:
    s = gymnasium.spaces
    if type(space) is s.Box:
        return {_TAG: "space", "kind": "box", "low": space.low, "high": space.high, "dtype": space.dtype.str}
    if type(space) is s.Discrete:
        return {_TAG: "space", "kind": "discrete", "n": int(space.n), "start": int(space.start)}
    if type(space) is s.MultiDiscrete:
        return {_TAG: "space", "kind": "multi_discrete", "nvec": space.nvec, "start": space.start}
    if type(space) is s.MultiBinary:
        return {_TAG: "space", "kind": "multi_binary", "n": _encode(space.n)}
    if type(space) is s.Dict:
        return {_TAG: "space", "kind": "dict", "spaces": [[k, _encode_space(x)] for k, x in space.spaces.items()]}
    if type(space) is s.Tuple:
        return {_TAG: "space", "kind": "tuple", "spaces": [_encode_space(x) for x in space.spaces]}
    raise _Unsafe


def _encode_schedule_closure(v: types.FunctionType) -> dict[str, Any] | None:
    """The closures of SB3's deprecated ``get_linear_fn``, ``constant_fn`` and ``get_schedule_fn``, described as the
    schedule classes that compute the same (their code is the same expression); None for any other function."""
    from stable_baselines3.common import utils

    def made_by(name: str) -> bool:  # the function's code is the one compiled inside SB3's factory
        factory = getattr(utils, name, None)
        return isinstance(factory, types.FunctionType) and v.__code__ in factory.__code__.co_consts

    cells = dict(zip(v.__code__.co_freevars, (c.cell_contents for c in v.__closure__ or ()), strict=True))
    if made_by("get_linear_fn") and {"start", "end", "end_fraction"} <= set(cells):
        start, end, end_fraction = cells["start"], cells["end"], cells["end_fraction"]
        if all(isinstance(x, (int, float)) for x in (start, end, end_fraction)):
            return {_TAG: "schedule", "kind": "linear", "start": start, "end": end, "end_fraction": end_fraction}
    if made_by("constant_fn") and isinstance(cells.get("val"), (int, float)):
        return {_TAG: "schedule", "kind": "constant", "val": cells["val"]}
    if made_by("get_schedule_fn") and "value_schedule" in cells:
        try:
            return {_TAG: "schedule", "kind": "float", "inner": _encode(cells["value_schedule"])}
        except _Unsafe:
            return None
    return None


def _encode_noise(v: Any) -> dict[str, Any]:
    """An SB3 action noise as its class, the arguments that rebuild it and its state; others are unsafe."""
    from stable_baselines3.common import noise

    t = type(v)
    if t is noise.NormalActionNoise:
        return {
            _TAG: "action_noise",
            "kind": "normal",
            "mean": _encode(v._mu),
            "sigma": _encode(v._sigma),
            "dtype": _dtype(v._dtype),
        }
    if t is noise.OrnsteinUhlenbeckActionNoise:
        return {
            _TAG: "action_noise",
            "kind": "ornstein_uhlenbeck",
            "mean": _encode(v._mu),
            "sigma": _encode(v._sigma),
            "theta": _encode(v._theta),
            "dt": _encode(v._dt),
            "initial_noise": _encode(v.initial_noise),
            "dtype": _dtype(v._dtype),
            "noise_prev": _encode(v.noise_prev),
        }
    if t is noise.VectorizedActionNoise:
        return {
            _TAG: "action_noise",
            "kind": "vectorized",
            "base": _encode_noise(v.base_noise),
            "noises": [_encode_noise(n) for n in v.noises],
        }
    raise _Unsafe


def _dtype(dtype: Any) -> str:
    try:
        return str(np.dtype(dtype).str)
    except TypeError as exc:
        raise _Unsafe from exc


def _decode_noise(v: dict[str, Any]) -> Any:
    from stable_baselines3.common import noise

    kind = v["kind"]
    if kind == "normal":
        return noise.NormalActionNoise(v["mean"], v["sigma"], dtype=np.dtype(v["dtype"]).type)
    if kind == "ornstein_uhlenbeck":
        ou = noise.OrnsteinUhlenbeckActionNoise(
            v["mean"],
            v["sigma"],
            theta=v["theta"],
            dt=v["dt"],
            initial_noise=v["initial_noise"],
            dtype=np.dtype(v["dtype"]).type,
        )
        ou.noise_prev = v["noise_prev"]
        return ou
    if kind == "vectorized":
        vec = noise.VectorizedActionNoise(_decode_noise(v["base"]), len(v["noises"]))
        vec._noises = [_decode_noise(n) for n in v["noises"]]  # the setter would reset each noise's state
        return vec
    raise ValueError(f"unknown action noise kind {kind!r}")


def decode_entry(v: Any, where: str) -> Any:
    """Rebuild one safely described value (no unpickling, imports limited to the allowed libraries)."""
    if isinstance(v, list):
        return [decode_entry(x, where) for x in v]
    if isinstance(v, tuple):
        return tuple(decode_entry(x, where) for x in v)
    if type(v) is collections.OrderedDict:
        return collections.OrderedDict((k, decode_entry(x, where)) for k, x in v.items())
    if not isinstance(v, dict):
        return v
    if _TAG not in v:
        return {k: decode_entry(x, where) for k, x in v.items()}
    try:
        return _decode_tagged(v, where)
    except (KeyError, TypeError, ValueError, AttributeError, ImportError) as exc:
        raise CorruptSnapshotError(f"{where}: cannot rebuild SB3 data entry {str(v)[:80]}: {exc}") from exc


def _decode_tagged(v: dict[str, Any], where: str) -> Any:
    kind = v[_TAG]
    if kind == "deque":
        return collections.deque((decode_entry(x, where) for x in v["items"]), maxlen=v["maxlen"])
    if kind == "class":
        return _import_class(str(v["name"]))
    if kind == "enum":
        cls = _import_class(str(v["class"]))
        if not issubclass(cls, enum.Enum):
            raise ValueError(f"{v['class']} is not an enum")
        return cls(decode_entry(v["value"], where))
    if kind == "train_freq":
        from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit

        return TrainFreq(int(v["frequency"]), TrainFrequencyUnit(v["unit"]))
    if kind == "schedule":
        from stable_baselines3.common import utils

        if v["kind"] == "float":
            return utils.FloatSchedule(decode_entry(v["inner"], where))
        if v["kind"] == "constant":
            return utils.ConstantSchedule(v["val"])
        if v["kind"] == "linear":
            return utils.LinearSchedule(v["start"], v["end"], v["end_fraction"])
    if kind == "space":
        return _decode_space(v)
    if kind == "action_noise":
        return _decode_noise(v)
    raise ValueError(f"unknown kind {kind!r}")


def _decode_space(v: dict[str, Any]) -> Any:
    space = _decode_space_parameters(v)
    state = v.get("rng")
    if state is not None:
        name = state["bit_generator"]
        if name not in _BIT_GENERATORS:
            raise ValueError(f"unknown bit generator {name!r}")
        bit_generator = getattr(np.random, name)()
        bit_generator.state = state
        space._np_random = np.random.Generator(bit_generator)
    return space


def _decode_space_parameters(v: dict[str, Any]) -> Any:
    s = gymnasium.spaces
    kind = v["kind"]
    if kind == "box":
        return s.Box(low=v["low"], high=v["high"], dtype=np.dtype(v["dtype"]))
    if kind == "discrete":
        return s.Discrete(int(v["n"]), start=int(v["start"]))
    if kind == "multi_discrete":
        return s.MultiDiscrete(v["nvec"], start=v["start"])
    if kind == "multi_binary":
        n = v["n"]
        return s.MultiBinary(list(n) if isinstance(n, (list, tuple)) else n)
    if kind == "dict":
        return s.Dict({k: _decode_space(x) for k, x in v["spaces"]})
    if kind == "tuple":
        return s.Tuple([_decode_space(x) for x in v["spaces"]])
    raise ValueError(f"unknown space kind {kind!r}")


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _safe_class(cls: Any) -> bool:
    """Whether ``cls`` is a class defined in one of the packages a name may be imported from."""
    return isinstance(cls, type) and f"{cls.__module__}.".startswith(_IMPORTABLE)


def _importable_as(name: str, obj: Any) -> bool:
    try:
        return _import_class(name) is obj
    except (ImportError, AttributeError, ValueError):
        return False


@functools.cache
def _roles() -> tuple[type, ...]:
    """What a class named in SB3's data may be: what SB3 stores there (a policy, a features extractor or an
    activation is a ``torch.nn.Module``; an optimizer class; a replay-buffer class; HER's goal strategy, an
    enum), never a class whose constructor does something else (SB3's logger formats open files)."""
    from stable_baselines3.common.buffers import BaseBuffer
    from stable_baselines3.common.noise import ActionNoise

    return (torch.nn.Module, torch.optim.Optimizer, gymnasium.spaces.Space, BaseBuffer, ActionNoise, enum.Enum)


def _import_class(name: str) -> type:
    """``a.b.C`` (or ``a.b.C.Inner``) -> the class, found from the longest module prefix already imported.

    Nothing is imported: a module's import runs its code (``stable_baselines3.common.results_plotter`` would
    import matplotlib and pandas and write a font cache), and every class SB3 stores is defined in a module that
    the algorithm's own import has imported. Refused unless the name is in an allowed package, the attributes
    after the module are classes (never a module: ``torch.os.system`` would reach ``os.system``), what it names
    is a class whose defining module is in an allowed package too (a function or an object re-exported from
    elsewhere is refused), and of a kind SB3 stores (:func:`_roles`).
    """
    if not name.startswith(_IMPORTABLE):
        raise ValueError(f"refusing to import {name!r}: only classes of {', '.join(_IMPORTABLE)} are allowed")
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        obj: Any = sys.modules.get(".".join(parts[:i]))
        if obj is None:
            continue  # never imported here: a name must not make the load import (and run) a module
        for attr in parts[i:]:
            obj = getattr(obj, attr)
            if not isinstance(obj, type):
                raise ValueError(f"refusing to import {name!r}: {attr!r} is not a class")
        if not _safe_class(obj):
            raise ValueError(f"refusing to import {name!r}: it is defined in {obj.__module__}")
        if not issubclass(obj, _roles()):
            raise ValueError(
                f"refusing to import {name!r}: a class named in SB3's data must be a module, optimizer, space, "
                "buffer, action noise or enum"
            )
        return obj  # type: ignore[no-any-return]
    raise ImportError(
        f"cannot find {name}: no module of that name is imported (a load imports none; import the module that "
        "defines the class before loading, if you trust it)"
    )
