"""Writing a restored value to a local file that torch or safetensors reads without bucketsnap.

``bucketsnap restore`` uses these; they are plain functions for scripts too. Both write to a temp file beside
the destination and rename it into place, so a reader never sees half a file; the file gets the permissions any
new file gets (``0666`` less the umask), whichever the format.

* ``.pt`` (or ``.pth``, ``.bin``): ``torch.save`` of the value as it was restored, with numpy arrays and numpy
  scalars turned into tensors and Python numbers, since ``torch.load(path, weights_only=True)`` refuses numpy
  objects. The written file is then opened that way (memory-mapped, so cheaply): what it still refuses (a
  pickled object of the user's own class) is reported, not hidden.
* ``.safetensors``: safetensors holds a flat ``{name: tensor}`` dict only, so nested state dicts are flattened
  with dotted names (``{"net": {"0": {"weight": t}}}`` becomes ``net.0.weight``) and a bare tensor or array is
  stored under the member's key; a value holding anything but tensors and numpy arrays (an optimizer's
  learning rate, a step counter) is refused with a message naming it, rather than silently dropped.

torch is imported by these functions, not by the module: the command line imports it for every command.
"""

from __future__ import annotations

import contextlib
import copy
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bucketsnap.errors import BucketsnapError

if TYPE_CHECKING:
    import torch

__all__ = ["FORMATS", "TorchFile", "flatten_tensors", "format_of", "write_safetensors", "write_torch"]

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


def check_destination(path: str | os.PathLike[str]) -> None:
    """Raise BucketsnapError unless a file can be created at ``path`` (its directory exists and is one).

    >>> check_destination("/no-such-dir/policy.pt")
    Traceback (most recent call last):
    ...
    bucketsnap.errors.BucketsnapError: cannot write /no-such-dir/policy.pt: the directory /no-such-dir does not exist
    """
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        raise BucketsnapError(f"cannot write {target}: it is a directory; name a file in it, such as policy.pt")
    if not os.path.exists(folder):
        raise BucketsnapError(f"cannot write {target}: the directory {folder} does not exist")
    if not os.path.isdir(folder):
        raise BucketsnapError(f"cannot write {target}: {folder} is not a directory")


def flatten_tensors(value: Any, name: str, *, key: str = "tensor") -> dict[str, torch.Tensor]:
    """``value``'s tensors as a flat dict with dotted names, for safetensors.

    Args:
        value: a tensor, numpy array, or dicts/lists/tuples of them (a ``state_dict()``).
        name: what to call ``value`` in messages ("member 'policy' of itr 30").
        key: the name of ``value`` itself if it is a single tensor (the member's key).

    Raises:
        BucketsnapError: ``value`` holds something other than tensors, has no tensors, or two names collide.

    Example:
        >>> import torch
        >>> sorted(flatten_tensors({"net": {0: {"weight": torch.ones(2)}}, "bias": torch.zeros(1)}, "policy"))
        ['bias', 'net.0.weight']
        >>> list(flatten_tensors(np.zeros(3), "member 'rollouts' of itr 59", key="rollouts"))
        ['rollouts']
    """
    import torch

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
                f"cannot write {name} as safetensors: {where} is {_a(type(v).__name__)}, and safetensors holds "
                "only tensors. Write a .pt file instead, or restore a key that holds only tensors (a state_dict)."
            )

    def leaf(path: str, t: torch.Tensor) -> None:
        name_ = path or key
        if name_ in out:
            raise BucketsnapError(f"cannot write {name} as safetensors: two tensors would both be named {name_!r}")
        out[name_] = t.contiguous()

    walk(value, "")
    if not out:
        raise BucketsnapError(f"cannot write {name} as safetensors: it holds no tensors")
    return out


def write_safetensors(
    value: Any,
    path: str | os.PathLike[str],
    *,
    name: str,
    key: str = "tensor",
    metadata: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Flatten ``value`` (see :func:`flatten_tensors`) and write it as a safetensors file; return the tensors."""
    from safetensors.torch import save_file

    check_destination(path)
    tensors = {k: t.cpu() for k, t in flatten_tensors(value, name, key=key).items()}

    def save(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
        except (ValueError, TypeError) as exc:  # e.g. a dtype safetensors has no code for
            raise BucketsnapError(f"cannot write {name} as safetensors: {exc}. Write a .pt file instead.") from exc

    _atomic_write(path, save)
    return tensors


@dataclass(frozen=True)
class TorchFile:
    """What :func:`write_torch` wrote.

    Attributes:
        tensors: tensors in the file.
        converted: numpy arrays among them, written as tensors.
        refused: why ``torch.load(path, weights_only=True)`` refuses the file, or None where it reads it.
    """

    tensors: int
    converted: int
    refused: str | None


def write_torch(value: Any, path: str | os.PathLike[str]) -> TorchFile:
    """``torch.save`` ``value`` to ``path`` atomically, numpy arrays as tensors, and check that
    ``torch.load(path, weights_only=True)`` reads it."""
    import torch

    check_destination(path)
    counts = {"tensors": 0, "converted": 0}

    def plain(v: Any) -> Any:
        """``v`` with numpy arrays as tensors; containers are copied only where something inside changed."""
        if isinstance(v, torch.Tensor):
            counts["tensors"] += 1
            return v
        if isinstance(v, np.ndarray) and v.dtype.names is None and not v.dtype.hasobject:
            try:
                t = torch.from_numpy(np.array(v, order="C", copy=True))  # writable, contiguous, its own memory
            except TypeError:  # a dtype torch has no tensors of (float128, datetime64...): kept as it is
                return v
            counts["tensors"] += 1
            counts["converted"] += 1
            return t
        if isinstance(v, (np.number, np.bool_)):
            return v.item()
        if isinstance(v, dict) or type(v) in (list, tuple):
            items = list(v.items()) if isinstance(v, dict) else list(enumerate(v))
            changed = {k: new for k, x in items if (new := plain(x)) is not x}
            if not changed:
                return v
            if type(v) is tuple:
                return tuple(changed.get(i, x) for i, x in items)
            out = copy.copy(v)  # keeps the type and attributes, such as a state_dict's _metadata
            for k, new in changed.items():
                out[k] = new
            return out
        return v

    converted = plain(value)
    refused: list[str] = []

    def save(tmp: str) -> None:
        torch.save(converted, tmp)
        try:
            torch.load(tmp, weights_only=True, mmap=True)
        except Exception as exc:  # pickle.UnpicklingError naming the global it refused, usually
            refused.append(_first_line(str(exc)))

    _atomic_write(path, save)
    return TorchFile(counts["tensors"], counts["converted"], refused[0] if refused else None)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
    return found[:300]


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)  # read, not set
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    target = os.path.abspath(os.fspath(path))
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # as any new file: safetensors creates its file 0600
            os.replace(tmp, target)
        except BucketsnapError:
            raise
        except (OSError, RuntimeError) as exc:  # torch.save reports a missing directory as a RuntimeError
            reason = str(exc).replace(tmp, os.fspath(path))
            raise BucketsnapError(f"cannot write {os.fspath(path)}: {reason}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _a(word: str) -> str:
    """``word`` with its indefinite article: "an int", "a float".

    >>> _a("int"), _a("float"), _a("OrderedDict")
    ('an int', 'a float', 'an OrderedDict')
    """
    return f"{'an' if word[:1].lower() in 'aeio' else 'a'} {word}"
