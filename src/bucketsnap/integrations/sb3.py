"""Stable-Baselines3: save and load algorithms through any fsspec URL, a checkpoint callback, and SB3's own zips.

A snapshot of an SB3 algorithm holds the members SB3's zip holds, split so that each can be read alone::

    sb3                   algorithm class, SB3 version, which members are state dicts
    data                  SB3's class parameters, described without pickle where possible (spaces, schedules,
                          classes by import name; see bucketsnap.integrations._sb3_data)
    data_pickled          the entries that could only be cloudpickled, as bytes: unpickled only with
                          allow_pickle=True, or replaced by custom_objects
    policy, policy.optimizer, ...      one member per state dict (tensors, no pickle)
    pytorch_variables     SAC's log_ent_coef and the like
    vec_normalize         the statistics of the model's VecNormalize env, if it has one (arrays, no pickle)
    replay_buffer         with include_replay_buffer: the buffer as shared chunks (bucketsnap.buffers)

An inference host reads ``policy`` alone (``store.load(keys=["policy"])``): weights only, nothing unpickled, the
optimizer and the replay buffer never downloaded.

SB3's zips (``model.save()``) are read with ranged requests from any fsspec URL by :func:`load_sb3_zip`, and
:func:`export_sb3_zip` writes one that SB3's own ``load`` accepts.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import torch

try:
    import stable_baselines3 as sb3
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.save_util import is_json_serializable, recursive_setattr
    from stable_baselines3.common.utils import check_for_correct_spaces
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("bucketsnap.integrations.sb3 needs stable-baselines3: pip install 'bucketsnap[sb3]'") from exc

from bucketsnap._info import SnapshotInfo
from bucketsnap._storage import Storage
from bucketsnap._store import SnapshotStore, as_store
from bucketsnap._zipformat import read_directory, read_member
from bucketsnap.buffers import buffer_state, restore_buffer
from bucketsnap.errors import (
    CorruptSnapshotError,
    NotASnapshotError,
    SnapshotNotFoundError,
    StorageError,
    UnsafeLoadError,
    redact,
)
from bucketsnap.integrations import _sb3_vecnorm
from bucketsnap.integrations._sb3_data import encode_data, resolve_data, schedule_defaults

__all__ = [
    "SB3Zip",
    "SnapshotCallback",
    "export_sb3_zip",
    "load_model",
    "load_sb3_zip",
    "load_vec_normalize",
    "save_model",
]

FORMAT = "bucketsnap.sb3/1"
_META, _DATA, _PICKLED, _VARS, _BUFFER = "sb3", "data", "data_pickled", "pytorch_variables", "replay_buffer"
_VECNORM = "vec_normalize"
_RESERVED = (_META, _DATA, _PICKLED, _VARS, _BUFFER, _VECNORM)


def save_model(
    model: BaseAlgorithm,
    url_or_store: str | SnapshotStore,
    itr: int,
    *,
    include_replay_buffer: bool = False,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> SnapshotInfo:
    """Save an SB3 algorithm as snapshot ``itr``; with ``include_replay_buffer``, its replay buffer too.

    Example:
        >>> from stable_baselines3 import PPO
        >>> model = PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16)
        >>> save_model(model, "memory://doc/sb3", 0).keys()[:3]
        ['sb3', 'data', 'data_pickled']
    """
    store = as_store(url_or_store)
    return store.save(
        itr, model_state(model, include_replay_buffer=include_replay_buffer), metrics=metrics, overwrite=overwrite
    )


def model_state(model: BaseAlgorithm, *, include_replay_buffer: bool = False) -> dict[str, Any]:
    """The state :func:`save_model` saves, for use with ``store.save``/``save_async`` directly."""
    data = model.__dict__.copy()
    exclude = set(model._excluded_save_params())
    state_dicts, torch_vars = model._get_torch_save_params()
    exclude.update(name.split(".")[0] for name in state_dicts + torch_vars)
    for name in exclude:
        data.pop(name, None)
    safe, pickled = encode_data(data)
    params = model.get_parameters()
    bad = [name for name in params if name in _RESERVED]
    if bad:
        raise ValueError(f"{type(model).__name__} has state dicts named {bad}, which bucketsnap's layout reserves")
    algo = type(model)
    state: dict[str, Any] = {
        _META: {
            "format": FORMAT,
            "algo": f"{algo.__module__}.{algo.__qualname__}",
            "sb3_version": sb3.__version__,
            "params": list(params),
        },
        _DATA: safe,
        _PICKLED: pickled,
        **params,
        _VARS: {name: _getattr(model, name) for name in torch_vars},
    }
    vec_normalize = model.get_vec_normalize_env()
    if vec_normalize is not None:
        state[_VECNORM] = _sb3_vecnorm.vec_normalize_state(vec_normalize)
    if include_replay_buffer:
        buffer = getattr(model, "replay_buffer", None)
        if buffer is None:
            raise ValueError(f"{algo.__name__} has no replay buffer; pass include_replay_buffer=False")
        state[_BUFFER] = buffer_state(buffer)
    return state


def load_model(
    cls: type[BaseAlgorithm],
    url_or_store: str | SnapshotStore,
    which: int | str = "last",
    *,
    env: Any = None,
    device: torch.device | str = "auto",
    custom_objects: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    load_replay_buffer: bool = True,
    force_reset: bool = True,
) -> Any:
    """Rebuild the SB3 algorithm saved in snapshot ``which``, as ``cls.load`` would from SB3's zip.

    Nothing is unpickled without ``allow_pickle``. Schedules that were closures (``learning_rate=lambda p: ...``)
    are then rebuilt from ``cls``'s defaults, with a warning, unless ``custom_objects`` gives them.

    Args:
        cls: the algorithm class (``PPO``, ``SAC``, ``DQN``...); must be the class that was saved.
        env: the environment to continue training on (None: predict only). If it is (or wraps) a
            ``VecNormalize`` and the model was saved with one, the saved statistics are set on it.
        custom_objects: data entries to use instead of the saved ones (SB3's meaning).
        allow_pickle: unpickle data entries that were cloudpickled (a user's lambda schedule): code from the
            snapshot runs. Without it such entries must be given in ``custom_objects``.
        load_replay_buffer: restore the saved replay buffer, if there is one, into the new model's.

    Raises:
        UnsafeLoadError: a cloudpickled data entry was met without ``allow_pickle`` or a custom object.
        ValueError: ``cls`` is not the saved algorithm, or ``env`` does not match its spaces.
    """
    store = as_store(url_or_store)
    snap = store.open(which, map_location="cpu")
    where = snap.info.url
    meta = snap[_META]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NotASnapshotError(f"{where} is not an SB3 snapshot (no {_META!r} member of format {FORMAT})")
    expected = f"{cls.__module__}.{cls.__qualname__}"
    if meta["algo"] != expected:
        raise ValueError(f"{where} holds a {meta['algo']}; load it with that class, not {expected}")
    pickled = snap[_PICKLED]
    if not allow_pickle:
        custom_objects = {**schedule_defaults(cls, pickled, custom_objects, where), **(custom_objects or {})}
    _refuse_foreign_entries(cls, snap[_DATA], where)
    data = resolve_data(snap[_DATA], pickled, custom_objects=custom_objects, allow_pickle=allow_pickle, where=where)
    params = {name: snap[name] for name in meta["params"]}
    model = _build(cls, data, params, snap[_VARS], env=env, device=device, force_reset=force_reset)
    vec_normalize = model.get_vec_normalize_env() if env is not None else None
    if vec_normalize is not None and _VECNORM in snap:
        _sb3_vecnorm.apply_vec_normalize(snap[_VECNORM], vec_normalize, where)
    if load_replay_buffer and _BUFFER in snap and getattr(model, "replay_buffer", None) is not None:
        restore_buffer(store, model.replay_buffer, key=_BUFFER, which=snap.info.itr)
    return model


def load_vec_normalize(url_or_store: str | SnapshotStore, venv: Any, which: int | str = "last") -> Any:
    """A ``VecNormalize`` over ``venv`` with the statistics saved in snapshot ``which``, as SB3's
    ``VecNormalize.load(path, venv)`` returns, without unpickling anything.

    Raises:
        KeyError: the model of that snapshot had no VecNormalize env.
    """
    store = as_store(url_or_store)
    snap = store.open(which, map_location="cpu")
    if _VECNORM not in snap:
        raise KeyError(f"{snap.info.url} holds no VecNormalize statistics: its model's env had no VecNormalize")
    return _sb3_vecnorm.wrap(snap[_VECNORM], venv, snap.info.url)


def _refuse_foreign_entries(cls: type[BaseAlgorithm], data: dict[str, Any], where: str) -> None:
    """Refuse plain-data entries that SB3 never saves and that the load would act on: ``env`` (SB3 makes an env
    from a string with ``gym.make``, which imports the module the string names) and names of the algorithm's
    methods (the entries become the model's attributes, and would replace them)."""
    foreign = sorted(k for k in data if k == "env" or callable(getattr(cls, k, None)))
    if foreign:
        raise CorruptSnapshotError(
            f"{where}: the SB3 data member holds {', '.join(map(repr, foreign))}, which SB3 never saves and a "
            "load would act on: the snapshot was edited; load an intact snapshot"
        )


def _build(
    cls: type[BaseAlgorithm],
    data: dict[str, Any],
    params: dict[str, Any],
    pytorch_variables: dict[str, Any] | None,
    *,
    env: Any,
    device: torch.device | str,
    force_reset: bool,
) -> Any:
    """The body of SB3's ``BaseAlgorithm.load``, from an already decoded data dict."""
    kwargs = data.get("policy_kwargs")
    if isinstance(kwargs, dict):
        kwargs.pop("device", None)
    if "observation_space" not in data or "action_space" not in data:
        raise KeyError("the observation_space and action_space were not saved; pass them in custom_objects")
    if env is not None:
        env = cls._wrap_env(env, data.get("verbose", 0))
        check_for_correct_spaces(env, data["observation_space"], data["action_space"])
        if force_reset:
            data["_last_obs"] = None
        data["n_envs"] = env.num_envs
    elif "env" in data:
        env = data["env"]
    model = cls(policy=data["policy_class"], env=env, device=device, _init_setup_model=False)  # type: ignore[call-arg]
    model.__dict__.update(data)
    model._setup_model()
    model.set_parameters(params, exact_match=True, device=device)
    for name, value in (pytorch_variables or {}).items():
        if value is not None:
            recursive_setattr(model, f"{name}.data", value.data.to(model.device))
    if model.use_sde:
        model.policy.reset_noise()  # type: ignore[operator]
    return model


def _getattr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class SnapshotCallback(BaseCallback):  # type: ignore[misc]
    """An SB3 callback that saves the model (and its replay buffer) to a run every ``save_freq`` calls.

    The statistics of the model's ``VecNormalize`` env, if it has one, are in every snapshot (SB3's
    ``CheckpointCallback`` needs ``save_vecnormalize=True`` and writes a pickle beside each zip).

    The itr of each snapshot is ``model.num_timesteps``. Like SB3's ``CheckpointCallback``, ``save_freq``
    counts calls of the callback, i.e. steps of the vectorized env (divide by ``n_envs`` for env steps).

    Args:
        url_or_store: where the run lives.
        save_freq: save every this many calls.
        include_replay_buffer: also save an off-policy algorithm's replay buffer (as chunks that later
            snapshots share, so each save uploads only what changed).
        async_saving: save in a background thread; training pays only for a host copy.
        retention: a :mod:`bucketsnap.retention` policy for a store made from a URL.
    """

    def __init__(
        self,
        url_or_store: str | SnapshotStore,
        save_freq: int,
        *,
        include_replay_buffer: bool = False,
        async_saving: bool = False,
        retention: Any = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if save_freq < 1:
            raise ValueError(f"save_freq must be at least 1, not {save_freq}")
        if retention is not None:
            if isinstance(url_or_store, SnapshotStore):
                raise ValueError("retention applies to a store made from a URL; set it on your SnapshotStore")
            self.store = SnapshotStore(url_or_store, retention=retention)
        else:
            self.store = as_store(url_or_store)
        self.save_freq = save_freq
        self.include_replay_buffer = include_replay_buffer
        self.async_saving = async_saving
        self.saved: list[int] = []

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            self.save()
        return True

    def save(self) -> None:
        """Save the model now, at itr ``num_timesteps``."""
        itr = int(self.num_timesteps)
        state = model_state(self.model, include_replay_buffer=self.include_replay_buffer)
        if self.async_saving:
            self.store.save_async(itr, state, overwrite=True)
        else:
            self.store.save(itr, state, overwrite=True)
        self.saved.append(itr)
        if self.verbose:
            print(f"bucketsnap: saved itr {itr} to {self.store.url}")

    def _on_training_end(self) -> None:
        self.store.flush()  # surface a background save's error here, not at the next run


# -- SB3's own zip format -------------------------------------------------------------------------------------


@dataclass
class SB3Zip:
    """What :func:`load_sb3_zip` read from an SB3 zip.

    Attributes:
        data: the class parameters; cloudpickled entries only if replaced or allowed.
        params: state dict name -> state dict, for the names that were asked for.
        pytorch_variables: ``pytorch_variables.pth``, if asked for and present.
        sb3_version: the SB3 version that wrote the zip.
        skipped: cloudpickled data entries that were not unpickled (no ``allow_pickle``, no custom object).
        members: every member name in the zip.
        url: where the zip was read from, credentials redacted.
    """

    data: dict[str, Any]
    params: dict[str, Any]
    pytorch_variables: dict[str, Any] | None
    sb3_version: str
    skipped: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    url: str = ""

    def to_model(
        self,
        cls: type[BaseAlgorithm],
        *,
        env: Any = None,
        device: torch.device | str = "auto",
        force_reset: bool = True,
    ) -> Any:
        """The algorithm, rebuilt as SB3's ``cls.load`` rebuilds it from this zip; then :func:`save_model` keeps
        it in a run, from which every later load needs no pickle.

        Raises:
            UnsafeLoadError: entries SB3 cloudpickled were skipped: read the zip with ``allow_pickle=True`` (or
                give them in ``custom_objects``).
            ValueError: the zip was read without all its state dicts (read it with ``params=None``).
        """
        if self.skipped:
            raise UnsafeLoadError(
                f"{self.url}: SB3 cloudpickled {', '.join(self.skipped)} and they were not unpickled; read the zip "
                "with load_sb3_zip(..., params=None, allow_pickle=True) if you trust it, or give them in "
                "custom_objects"
            )
        names = [n[: -len(".pth")] for n in self.members if n.endswith(".pth") and n != "pytorch_variables.pth"]
        missing = sorted(set(names) - set(self.params))
        if missing:
            raise ValueError(f"{self.url} was read without the state dicts {missing}: read it with params=None")
        return _build(
            cls, dict(self.data), self.params, self.pytorch_variables, env=env, device=device, force_reset=force_reset
        )


def load_sb3_zip(
    url: str,
    *,
    params: Iterable[str] | None = ("policy",),
    custom_objects: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    storage_options: dict[str, Any] | None = None,
) -> SB3Zip:
    """Read a zip written by SB3's ``model.save()`` from any fsspec URL, with ranged reads.

    Only the central directory, ``data`` and the state dicts named in ``params`` (default: the policy, not
    the optimizer) are downloaded; ``params=None`` reads them all, and ``pytorch_variables.pth`` too. State
    dicts are loaded with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
    containers. Data entries SB3 cloudpickled are unpickled only with ``allow_pickle=True``; an entry named in
    ``custom_objects`` is replaced and never unpickled (SB3's semantics), and others are listed in ``skipped``.

    Raises:
        SnapshotNotFoundError: nothing at ``url``.
        CorruptSnapshotError: not a readable zip, or a member fails its CRC.
        KeyError: a requested state dict is not in the zip.
    """
    shown = redact(url)
    storage, zip_name = _object_storage(url, storage_options)
    try:
        size = storage.size(zip_name)
    except FileNotFoundError as exc:
        raise SnapshotNotFoundError(f"no SB3 zip at {shown}") from exc

    def read_range(start: int, end: int) -> bytes:
        return storage.read(zip_name, start, end)

    entries = read_directory(read_range, size, where=shown)

    def member(name: str) -> bytes:
        return read_member(read_range, entries[name], size, where=shown)

    data: dict[str, Any] = {}
    skipped: list[str] = []
    custom = dict(custom_objects or {})
    if "data" in entries:
        for key, item in json.loads(member("data")).items():
            if key in custom:
                data[key] = custom[key]
            elif isinstance(item, dict) and ":serialized:" in item:
                if allow_pickle:
                    data[key] = cloudpickle.loads(base64.b64decode(item[":serialized:"]))
                else:
                    skipped.append(key)
            else:
                data[key] = item
    names = [n[: -len(".pth")] for n in entries if n.endswith(".pth") and n != "pytorch_variables.pth"]
    wanted = names if params is None else list(params)
    loaded = {}
    for name in wanted:
        if f"{name}.pth" not in entries:
            raise KeyError(f"{shown} has no state dict {name!r}; it has {names}")
        loaded[name] = torch.load(io.BytesIO(member(f"{name}.pth")), map_location=device, weights_only=True)
    variables = None
    if params is None and "pytorch_variables.pth" in entries:
        variables = torch.load(io.BytesIO(member("pytorch_variables.pth")), map_location=device, weights_only=True)
    version = member("_stable_baselines3_version").decode() if "_stable_baselines3_version" in entries else ""
    return SB3Zip(data, loaded, variables, version, skipped, list(entries), shown)


def export_sb3_zip(
    url_or_store: str | SnapshotStore,
    which: int | str,
    dest_url: str,
    *,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write snapshot ``which`` as a zip that SB3's own ``load`` accepts, to ``dest_url``; return its URL.

    Cloudpickled data entries are copied as they are (never unpickled here); the others are rebuilt from their
    safe description and cloudpickled the way SB3 does, since that is what SB3's format expects.
    """
    store = as_store(url_or_store)
    snap = store.open(which, map_location="cpu")
    meta = snap[_META]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NotASnapshotError(f"{snap.info.url} is not an SB3 snapshot (no {_META!r} member of format {FORMAT})")
    safe = resolve_data(snap[_DATA], {}, custom_objects=None, allow_pickle=False, where=snap.info.url)
    serializable: dict[str, Any] = {}
    for name, value in safe.items():
        if is_json_serializable(value):
            serializable[name] = value
        else:
            encoded = base64.b64encode(cloudpickle.dumps(value)).decode()
            serializable[name] = {":type:": str(type(value)), ":serialized:": encoded}
    for name, entry in snap[_PICKLED].items():
        serializable[name] = {":type:": entry["type"], ":serialized:": base64.b64encode(entry["bytes"]).decode()}
    variables = snap[_VARS]
    # single_writer: one object, never committed over another's, needs no probe of the store's exclusive create
    storage, zip_name = _object_storage(dest_url, storage_options, single_writer=True)
    with storage.write(zip_name) as f, zipfile.ZipFile(f, "w") as archive:
        archive.writestr("data", json.dumps(serializable, indent=4))
        if variables:
            with archive.open("pytorch_variables.pth", "w", force_zip64=True) as out:
                torch.save(variables, out)
        for name in meta["params"]:
            with archive.open(f"{name}.pth", "w", force_zip64=True) as out:
                torch.save(snap[name], out)
        archive.writestr("_stable_baselines3_version", str(meta["sb3_version"]))
        archive.writestr(
            "system_info.txt",
            f"- Exported by: bucketsnap from {snap.info.url}\n- Python: {platform.python_version()}\n"
            f"- PyTorch: {torch.__version__}\n",
        )
    return redact(dest_url)


def _object_storage(
    url: str, storage_options: dict[str, Any] | None, *, single_writer: bool = False
) -> tuple[Storage, str]:
    """A :class:`~bucketsnap._storage.Storage` on the directory of the single object at ``url``, and its name.

    Raises:
        StorageError: the URL cannot be opened (an unknown protocol, a backend library not installed...).
    """
    if "://" in url or "::" in url:
        parent, _, name = url.rpartition("/")
        if parent.endswith(":/"):  # memory://model.zip: the object is at the filesystem's root
            parent += "/"
    else:
        parent, name = os.path.split(url)
    try:
        return Storage(parent or ".", storage_options=storage_options, single_writer=single_writer), name
    except StorageError:
        raise
    except Exception as exc:  # BucketsnapError for a protocol fsspec does not know, TypeError for bad options
        raise StorageError(f"cannot open {redact(url)}: {type(exc).__name__}: {redact(str(exc))[:300]}") from exc
