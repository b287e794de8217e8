"""SB3's ``ReplayBuffer`` and ``DictReplayBuffer`` as bucketsnap buffer kinds (:class:`~bucketsnap.buffers.BufferKind`).

:mod:`bucketsnap.buffers` imports this module, which registers the kinds, the first time it meets a buffer
after ``stable_baselines3`` was imported, so a user never imports it, and bucketsnap never imports SB3 for
someone who does not use it.

Every array is saved in its physical ring layout with ``pos`` and ``full``, and restored in place into a buffer
of the same shape (``buffer_size``, ``n_envs``, ``optimize_memory_usage``), so a buffer that has wrapped around
comes back exact. Dict observations are saved as fields ``observations/<key>``. ``HerReplayBuffer`` (a
``DictReplayBuffer`` that also holds episode bookkeeping) is refused rather than saved incompletely, and so is a
subclass holding attributes of its own (a prioritized buffer's priorities): each needs a kind of its own.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer
from stable_baselines3.her.her_replay_buffer import HerReplayBuffer

from bucketsnap.buffers import BufferKind, BufferState, Ring, SavedBuffer, register_buffer_kind

__all__: list[str] = []


class _SB3Kind(BufferKind):
    buffer_class: ClassVar[type[ReplayBuffer]]

    def matches(self, buffer: Any) -> bool:
        if isinstance(buffer, HerReplayBuffer):
            raise TypeError("SB3's HerReplayBuffer is not supported yet: save it with model.save_replay_buffer()")
        if not isinstance(buffer, self.buffer_class):
            return False
        extra = sorted(set(vars(buffer)) - _SB3_ATTRIBUTES)
        if extra:  # a subclass's own state (a prioritized buffer's priorities) would be lost without a word
            raise TypeError(
                f"{type(buffer).__qualname__} holds attributes SB3's {self.buffer_class.__name__} has not "
                f"({', '.join(extra)}), which this kind would neither save nor restore: register a buffer kind "
                "for it with bucketsnap.buffers.register_buffer_kind"
            )
        return True

    def state(self, buffer: Any) -> BufferState:
        size = int(buffer.buffer_size)
        rows = size if buffer.full else int(buffer.pos)
        if buffer.optimize_memory_usage and not buffer.full:
            rows = min(rows + 1, size)  # the next observation of the newest transition lives one row further
        attrs: dict[str, Any] = {
            "pos": int(buffer.pos),
            "full": bool(buffer.full),
            "buffer_size": size,
            "n_envs": int(buffer.n_envs),
            "optimize_memory_usage": bool(buffer.optimize_memory_usage),
            "handle_timeout_termination": bool(buffer.handle_timeout_termination),
        }
        arrays = _arrays(buffer)
        # next_observations[t] is observations[t + 1] but where an episode ended at t: stored once
        shifted = {n: "observations" + n.removeprefix("next_observations") for n in arrays if n.startswith("next_")}
        return BufferState(arrays, rows, attrs, Ring(size, int(buffer.pos), bool(buffer.full)), shifted)

    def restore(self, buffer: Any, saved: SavedBuffer) -> None:
        attrs = saved.attrs
        for name in ("buffer_size", "n_envs", "optimize_memory_usage"):
            ours = getattr(buffer, name)
            if attrs.get(name) != ours:
                raise ValueError(
                    f"{saved.where} was saved from a buffer with {name}={attrs.get(name)!r}; this one has {ours!r}"
                )
        into = _arrays(buffer)
        saved.check_fields(into)
        saved.read_into(into)
        buffer.pos, buffer.full = int(attrs["pos"]), bool(attrs["full"])


class _DictReplayBufferKind(_SB3Kind):
    name = "sb3.DictReplayBuffer"
    buffer_class = DictReplayBuffer


class _ReplayBufferKind(_SB3Kind):
    name = "sb3.ReplayBuffer"
    buffer_class = ReplayBuffer

    def matches(self, buffer: Any) -> bool:
        return super().matches(buffer) and not isinstance(buffer, DictReplayBuffer)


#: The instance attributes of SB3's ReplayBuffer and DictReplayBuffer: what this kind saves (the arrays, ``pos``,
#: ``full``), checks (the sizes and flags) or takes from the buffer restored into (spaces, shapes, device).
_SB3_ATTRIBUTES = frozenset(
    {
        "buffer_size",
        "observation_space",
        "action_space",
        "obs_shape",
        "action_dim",
        "pos",
        "full",
        "device",
        "n_envs",
        "optimize_memory_usage",
        "observations",
        "next_observations",
        "actions",
        "rewards",
        "dones",
        "handle_timeout_termination",
        "timeouts",
    }
)


def _arrays(buffer: Any) -> dict[str, np.ndarray]:
    """The arrays of an SB3 replay buffer, by field name, to save and to restore into; dict observations as
    ``observations/<key>``."""
    arrays: dict[str, np.ndarray] = {}
    for attr in ("observations", "next_observations"):
        value = getattr(buffer, attr, None)
        if isinstance(value, dict):
            arrays.update({f"{attr}/{k}": v for k, v in value.items()})
        elif value is not None and not (attr == "next_observations" and buffer.optimize_memory_usage):
            arrays[attr] = value
    for attr in ("actions", "rewards", "dones", "timeouts"):
        arrays[attr] = getattr(buffer, attr)
    return arrays


register_buffer_kind(_DictReplayBufferKind())
register_buffer_kind(_ReplayBufferKind())
