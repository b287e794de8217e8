"""pytorchrl's storages (``pytorchrl.agent.storages``) as a buffer kind (:class:`~bucketsnap.buffers.BufferKind`).

:mod:`bucketsnap.buffers` imports this module, which registers the kind, the first time it meets a buffer after
``pytorchrl`` was imported, so a user never imports it.

A pytorchrl storage keeps its transitions in ``data`` (field -> array or tensor, or a dict of them for dict
observations), allocated lazily from the first sample, plus counters (``step``, ``size``...) and, in some
storages, small pending state (an n-step deque, a recurrent overlap slice). What ``get_all_buffer_data()`` returns
is a view for training, not the storage's state (the recurrent hidden-state fields are 1-row placeholders for
feed-forward actors, and a wrapped ring is cut at ``step``), so this kind saves the state itself:

* every field whose rows are the storage's time axis (the most rows of all fields), every row of it (rows not
  written yet too: a ``PERBuffer`` gives them a priority of its own), as content-addressed chunks;
* every other field (the placeholders), and every attribute that is plain data (numbers, strings, ``None``,
  arrays, tensors, and dicts, lists, tuples and deques of those), with the chunk table, without pickle;
* nothing of the collaborators the storage was built with (``actor``, ``algo``, ``envs``, ``device``,
  ``her_function``, and ``recurrent_actor``, which is the actor's), which the new storage gets from its own
  constructor.

An attribute of any other type is refused with a TypeError rather than saved incompletely. A restore fills a
storage of the same class and ``max_size``, freshly built or used, allocating its fields as saved (on the
storage's device), and sets its attributes back.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import torch
from pytorchrl.agent.storages.base import Storage

from bucketsnap.buffers import BufferKind, BufferState, SavedBuffer, register_buffer_kind

__all__: list[str] = []

#: Attributes that are the storage's collaborators or constants of its class, not its state.
_NOT_STATE = frozenset({"actor", "algo", "envs", "device", "her_function", "recurrent_actor"})
#: Fields and attributes kept with the table (not chunked) must stay small.
_SMALL_BYTES = 16 << 20


class _PytorchrlStorageKind(BufferKind):
    name = "pytorchrl.Storage"

    def matches(self, buffer: Any) -> bool:
        return isinstance(buffer, Storage)

    def state(self, buffer: Any) -> BufferState:
        where = _describe(buffer)
        fields = dict(_fields(buffer.data))
        if not fields:
            raise ValueError(
                f"{where} holds no data yet (its tensors are made from the first sample): insert one first"
            )
        ring = max(_rows(v) for v in fields.values())
        arrays = {name: _numpy(v) for name, v in fields.items() if _rows(v) == ring}
        small = {name: _copy(v) for name, v in fields.items() if _rows(v) != ring}
        # Every row, written or not: a storage may give rows it has not written yet a value of its own (a
        # PERBuffer's priorities start at its default error, not 0), and unwritten rows cost little (zero chunks
        # compress to almost nothing and are stored once).
        rows = ring
        attrs: dict[str, Any] = {
            "class": _class_name(buffer),
            "max_size": int(buffer.max_size),
            "ring": ring,
            "layout": _layout(buffer.data),
            "tensors": sorted(name for name, v in fields.items() if isinstance(v, torch.Tensor)),
            "small_fields": small,
            "state": _plain_state(buffer, where),
        }
        _check_small(small, where)
        return BufferState(arrays, rows, attrs)

    def restore(self, buffer: Any, saved: SavedBuffer) -> None:
        attrs, where = saved.attrs, saved.where
        if attrs.get("class") != _class_name(buffer):
            raise ValueError(f"{where} was saved from a {attrs.get('class')}; this storage is a {_class_name(buffer)}")
        if int(attrs["max_size"]) != int(buffer.max_size):
            raise ValueError(
                f"{where} was saved from a storage of max_size {attrs['max_size']}; this one has {buffer.max_size}"
            )
        tensors = set(attrs.get("tensors", ()))
        ring = {f.name: np.zeros((int(attrs["ring"]), *f.row_shape), dtype=f.dtype) for f in saved.table.fields}
        saved.read_into(ring)
        values: dict[str, Any] = {**ring, **{n: np.array(v) for n, v in attrs["small_fields"].items()}}
        device = getattr(buffer, "device", None)
        data: dict[str, Any] = {}
        for key, sub in attrs["layout"]:
            if sub is None:
                data[key] = _placed(values.pop(key), key in tensors, device) if key in values else None
            else:
                data[key] = {s: _placed(values.pop(f"{key}/{s}"), f"{key}/{s}" in tensors, device) for s in sub}
        for name, value in attrs["state"].items():
            setattr(buffer, name, _decode(value))
        buffer.data = data


def _fields(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """``data``'s arrays and tensors by field name (``<key>/<sub>`` inside dict fields)."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            out.extend((f"{key}/{sub}", v) for sub, v in value.items())
        elif value is not None:
            out.append((key, value))
    return out


def _layout(data: dict[str, Any]) -> list[list[Any]]:
    """``data``'s keys in order, each with its dict field's keys (or ``None``), to rebuild it exactly."""
    return [[key, list(value) if isinstance(value, dict) else None] for key, value in data.items()]


def _rows(value: Any) -> int:
    return int(value.shape[0]) if value.ndim else -1


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"a pytorchrl data field holds a {type(value).__name__}, not an array or tensor")


def _copy(value: Any) -> np.ndarray:
    return np.array(_numpy(value), copy=True)


def _placed(array: np.ndarray, tensor: bool, device: Any) -> Any:
    if not tensor:
        return array
    out = torch.from_numpy(array)
    return out.to(device) if device is not None else out


def _plain_state(buffer: Any, where: str) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name, value in vars(buffer).items():
        if name in _NOT_STATE or name == "data":
            continue
        try:
            state[name] = _encode(value)
        except TypeError as exc:
            raise TypeError(
                f"cannot save {where}: its attribute {name!r} {exc}; it is not saved incompletely"
            ) from None
    return state


def _encode(value: Any) -> Any:
    """Plain data the value encoding stores without pickle; deques and tensors tagged to come back as such."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return np.array(value, copy=True)
    if isinstance(value, torch.Tensor):
        return {"$pytorchrl": "tensor", "value": value.detach().cpu().numpy().copy()}
    if isinstance(value, collections.deque):
        return {"$pytorchrl": "deque", "maxlen": value.maxlen, "items": [_encode(v) for v in value]}
    if isinstance(value, tuple):
        return tuple(_encode(v) for v in value)
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        return {"$pytorchrl": "dict", "items": [[k, _encode(v)] for k, v in value.items()]}
    raise TypeError(f"holds a {type(value).__module__}.{type(value).__qualname__}")


def _decode(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_decode(v) for v in value)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict) and "$pytorchrl" in value:
        tag = value["$pytorchrl"]
        if tag == "tensor":
            return torch.from_numpy(np.array(value["value"]))
        if tag == "deque":
            return collections.deque((_decode(v) for v in value["items"]), maxlen=value["maxlen"])
        if tag == "dict":
            return {k: _decode(v) for k, v in value["items"]}
    return value


def _check_small(small: dict[str, np.ndarray], where: str) -> None:
    total = sum(a.nbytes for a in small.values())
    if total > _SMALL_BYTES:
        raise ValueError(
            f"{where}: fields {sorted(small)} do not have the storage's rows and hold {total} bytes; "
            "only small placeholders are kept outside the chunks"
        )


def _class_name(buffer: Any) -> str:
    return f"{type(buffer).__module__}.{type(buffer).__qualname__}"


def _describe(buffer: Any) -> str:
    return f"pytorchrl storage {type(buffer).__qualname__}"


register_buffer_kind(_PytorchrlStorageKind())
