"""Retention: which committed snapshots a run keeps, as small policies that are pure functions of the infos.

A policy looks at the list of committed :class:`~bucketsnap.SnapshotInfo` and returns the itrs to keep;
it reads nothing and deletes nothing. :class:`~bucketsnap.SnapshotStore` (``retention=...``) applies it after
each commit, and commits a manifest generation without the others. Because a policy is a function of the
whole list, applying it is idempotent: a prune that failed (or raced with another writer) is redone by the next
commit.

Policies combine with ``|`` (or :class:`KeepAny`): a snapshot is kept if any policy keeps it. garage's snapshot
modes are expressed this way (see :func:`garage_mode`)::

    "last"          KeepLast(1)
    "gap_and_last"  KeepEvery(gap) | KeepLast(1)

The store always keeps the newest committed snapshot (the one ``"last"`` resolves to), whatever the policy
says, so a policy that selects nothing (``KeepBest`` on a metric no snapshot has) cannot empty a run.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from bucketsnap._info import SnapshotInfo

__all__ = ["KeepAny", "KeepBest", "KeepEvery", "KeepLast", "RetentionPolicy", "garage_mode", "split"]


class RetentionPolicy(abc.ABC):
    """Base class of retention policies: ``keep(infos)`` returns the itrs to keep."""

    @abc.abstractmethod
    def keep(self, infos: Sequence[SnapshotInfo]) -> frozenset[int]:
        """The itrs of ``infos`` this policy keeps. ``infos`` may be in any order."""

    def _keep_itrs(self, itrs: Sequence[int]) -> frozenset[int] | None:
        """What :meth:`keep` keeps, from the itrs alone (ascending); None if it needs the entries (their metrics).

        A save applies a policy that needs only itrs without reading every entry of the run. A subclass that
        overrides :meth:`keep` gets None (its own ``keep`` decides), whatever class it derives from."""
        owner = next(c for c in type(self).__mro__ if "_kept_of_itrs" in vars(c))
        if type(self).keep is not owner.keep:  # type: ignore[attr-defined]
            return None
        return self._kept_of_itrs(itrs)

    def _kept_of_itrs(self, itrs: Sequence[int]) -> frozenset[int] | None:
        """What this class's own :meth:`keep` keeps of ``itrs`` (ascending), or None if it needs the entries."""
        return None

    def __or__(self, other: RetentionPolicy) -> KeepAny:
        if not isinstance(other, RetentionPolicy):
            return NotImplemented
        return KeepAny(self, other)


@dataclass(frozen=True)
class KeepLast(RetentionPolicy):
    """Keep the ``n`` snapshots with the highest itrs (the order ``"last"`` uses, not the save time); all of them
    while fewer than ``n`` are committed."""

    n: int

    def __post_init__(self) -> None:
        _check_count("KeepLast", "n", self.n, minimum=0)

    def keep(self, infos: Sequence[SnapshotInfo]) -> frozenset[int]:
        return self._kept_of_itrs(sorted(s.itr for s in infos))

    def _kept_of_itrs(self, itrs: Sequence[int]) -> frozenset[int]:
        # Not itrs[-n:]: that is the whole list for n=0. Clamped, since fewer than n snapshots is the usual start.
        return frozenset(itrs[max(len(itrs) - self.n, 0) :])


@dataclass(frozen=True)
class KeepEvery(RetentionPolicy):
    """Keep every snapshot whose itr is a multiple of ``k`` (itr 0 included, as garage's ``"gap"`` mode)."""

    k: int

    def __post_init__(self) -> None:
        _check_count("KeepEvery", "k", self.k, minimum=1)

    def keep(self, infos: Sequence[SnapshotInfo]) -> frozenset[int]:
        return self._kept_of_itrs([s.itr for s in infos])

    def _kept_of_itrs(self, itrs: Sequence[int]) -> frozenset[int]:
        return frozenset(itr for itr in itrs if itr % self.k == 0)


@dataclass(frozen=True)
class KeepBest(RetentionPolicy):
    """Keep the ``n`` snapshots with the best value of ``metric``.

    Args:
        n: how many to keep.
        metric: the name of a metric saved with the snapshots (``save(..., metrics={...})``).
        mode: ``"max"`` (higher is better) or ``"min"``.

    Ties on the metric go to the newer snapshot (the higher itr): of two snapshots with the same return, the
    one trained longer is kept. Values compare exactly, ints as ints (not rounded to floats). Snapshots without
    the metric, or whose value is not a number (str, bool, None), are not candidates; another policy in a union,
    or the store's rule that the newest snapshot is always kept, may still keep them.
    """

    n: int
    metric: str
    mode: Literal["max", "min"] = "max"

    def __post_init__(self) -> None:
        _check_count("KeepBest", "n", self.n, minimum=0)
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"KeepBest metric must be a metric name (a non-empty str), not {self.metric!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"KeepBest mode must be 'max' or 'min', not {self.mode!r}")

    def keep(self, infos: Sequence[SnapshotInfo]) -> frozenset[int]:
        sign = 1 if self.mode == "max" else -1
        scored: list[tuple[int | float, int]] = []
        for s in infos:
            value = s.metrics.get(self.metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                # Not float(value): an int beyond 2**53 would tie with its neighbours, and one beyond 1e308 would
                # raise OverflowError after the commit. Python compares int and float exactly.
                scored.append((sign * value, s.itr))
        scored.sort(reverse=True)  # best first; on equal values, higher itr first
        return frozenset(itr for _, itr in scored[: self.n])


@dataclass(frozen=True, init=False)
class KeepAny(RetentionPolicy):
    """Keep what any of ``policies`` keeps (``a | b`` builds one; nested unions are flattened)."""

    policies: tuple[RetentionPolicy, ...]

    def __init__(self, *policies: RetentionPolicy) -> None:
        flat: list[RetentionPolicy] = []
        for p in policies:
            if not isinstance(p, RetentionPolicy):
                raise TypeError(f"KeepAny takes retention policies, not {type(p).__name__}")
            flat.extend(p.policies if isinstance(p, KeepAny) else (p,))
        object.__setattr__(self, "policies", tuple(flat))

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.policies)) if self.policies else "KeepAny()"

    def keep(self, infos: Sequence[SnapshotInfo]) -> frozenset[int]:
        return frozenset().union(*(p.keep(infos) for p in self.policies))

    def _kept_of_itrs(self, itrs: Sequence[int]) -> frozenset[int] | None:
        kept = [p._keep_itrs(itrs) for p in self.policies]
        return None if any(k is None for k in kept) else frozenset().union(*(k for k in kept if k is not None))


def _dropped_itrs(policy: RetentionPolicy, itrs: Sequence[int]) -> list[int] | None:
    """The itrs (ascending) ``policy`` drops of ``itrs``, always keeping the highest; None if it needs the entries.

    >>> _dropped_itrs(KeepLast(2) | KeepEvery(10), [0, 5, 10, 11, 12, 13])
    [5, 11]
    """
    keep = policy._keep_itrs(itrs)
    if keep is None:
        return None
    return [itr for itr in itrs[:-1] if itr not in keep]


def split(policy: RetentionPolicy, infos: Sequence[SnapshotInfo]) -> tuple[list[SnapshotInfo], list[SnapshotInfo]]:
    """``(kept, dropped)``: apply ``policy`` to ``infos``, always keeping the one with the highest itr."""
    if not infos:
        return [], []
    keep = set(policy.keep(infos)) | {max(s.itr for s in infos)}
    return [s for s in infos if s.itr in keep], [s for s in infos if s.itr not in keep]


def garage_mode(mode: str, gap: int) -> RetentionPolicy | None:
    """The retention of garage's snapshot ``mode`` (None: keep everything that was saved).

    Which itrs are *saved* is the other half of a mode (``"gap"`` saves only multiples of ``gap``, ``"none"``
    saves nothing); :class:`~bucketsnap.Snapshotter` decides that.
    """
    if mode == "last":
        return KeepLast(1)
    if mode == "gap_and_last":
        return KeepEvery(gap) | KeepLast(1)
    if mode in ("all", "gap", "none"):
        return None
    raise ValueError(f"snapshot_mode must be one of 'all', 'last', 'gap', 'gap_and_last', 'none', not {mode!r}")


def _check_count(cls: str, name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{cls}({name}=...) must be an int >= {minimum}, not {value!r}")
