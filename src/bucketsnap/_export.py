"""Writing a restored value to a local file that torch or safetensors reads without bucketsnap.

``bucketsnap restore`` uses these; they are plain functions for scripts too. Both write to a temp file beside
the destination and rename it into place, so a reader never sees half a file.

* ``.pt`` (or ``.pth``, ``.bin``): ``torch.save`` of the value as it was restored; ``torch.load(path,
  weights_only=True)`` reads a state dict back.
* ``.safetensors``: safetensors holds a flat ``{name: tensor}`` dict only, so nested state dicts are flattened
  with dotted names (``{"net": {"0": {"weight": t}}}`` becomes ``net.0.weight``); a value holding anything but
  tensors and numpy arrays (an optimizer's learning rate, a step counter) is refused with a message naming
  it, rather than silently dropped.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bucketsnap.errors import BucketsnapError

__all__ = ["FORMATS", "flatten_tensors", "format_of", "write_safetensors", "write_torch"]

#: File suffix -> output format.
FORMATS = {".pt": "pt", ".pth": "pt", ".bin": "pt", ".safetensors": "safetensors"}


def format_of(path: str | os.PathLike[str]) -> str:
    """The output format (``"pt"`` or ``"safetensors"``) that ``path``'s suffix names.

    Raises:
        ValueError: the suffix is none of :data:`FORMATS`.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the format of {os.fspath(path)!r}: use a name ending in {', '.join(FORMATS)}")
    return FORMATS[suffix]


def flatten_tensors(value: Any, name: str) -> dict[str, torch.Tensor]:
    """``value``'s tensors as a flat dict with dotted names, for safetensors.

    Args:
        value: a tensor, numpy array, or dicts/lists/tuples of them (a ``state_dict()``).
        name: what to call ``value`` itself in messages, and its name if it is a single tensor.

    Raises:
        BucketsnapError: ``value`` holds something other than tensors, has no tensors, or two names collide.

    Example:
        >>> sorted(flatten_tensors({"net": {0: {"weight": torch.ones(2)}}, "bias": torch.zeros(1)}, "policy"))
        ['bias', 'net.0.weight']
    """
    out: dict[str, torch.Tensor] = {}

    def walk(v: Any, path: str) -> None:
        if isinstance(v, torch.Tensor):
            leaf(path, v.detach())
        elif isinstance(v, np.ndarray) and not v.dtype.hasobject and v.dtype.names is None:
            leaf(path, torch.from_numpy(np.ascontiguousarray(v)))
        elif isinstance(v, Mapping):
            for k, x in v.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise BucketsnapError(f"cannot write {name} as safetensors: {path or name} has a key {k!r}")
                walk(x, f"{path}.{k}" if path else str(k))
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{path}.{i}" if path else str(i))
        else:
            where = f"{path!r} in {name}" if path else name
            raise BucketsnapError(
                f"cannot write {name} as safetensors: {where} is a {type(v).__name__}, and safetensors holds only "
                "tensors. Write a .pt file instead, or restore a key that holds only tensors (a state_dict)."
            )

    def leaf(path: str, t: torch.Tensor) -> None:
        key = path or name
        if key in out:
            raise BucketsnapError(f"cannot write {name} as safetensors: two tensors would both be named {key!r}")
        out[key] = t.contiguous()

    walk(value, "")
    if not out:
        raise BucketsnapError(f"cannot write {name} as safetensors: it holds no tensors")
    return out


def write_safetensors(
    value: Any, path: str | os.PathLike[str], *, name: str, metadata: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Flatten ``value`` (see :func:`flatten_tensors`) and write it as a safetensors file; return the tensors."""
    from safetensors.torch import save_file

    tensors = {k: t.cpu() for k, t in flatten_tensors(value, name).items()}

    def save(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
        except (ValueError, TypeError, RuntimeError) as exc:  # e.g. a dtype safetensors has no code for
            raise BucketsnapError(f"cannot write {name} as safetensors: {exc}. Write a .pt file instead.") from exc

    _atomic_write(path, save)
    return tensors


def write_torch(value: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` ``value`` to ``path``, atomically."""
    _atomic_write(path, lambda tmp: torch.save(value, tmp))


def _atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    target = os.path.abspath(os.fspath(path))
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
