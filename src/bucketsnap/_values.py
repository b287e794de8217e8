"""Encoding of one member's value without pickle: a JSON tree for the structure, raw bytes for the arrays.

A member's raw (uncompressed) payload is::

    b"BSNPVAL1"                      8-byte magic
    header length                    8 bytes, little-endian unsigned
    header                           UTF-8 JSON: {"tree": <node>, "data_size": <int>}
    data                             the buffers the tree refers to, concatenated in tree order

A node is a JSON scalar (``null``, ``true``/``false``, integers, finite floats, strings), a JSON list (a Python
list), or a one-key object whose key says the type:

=====================  ========================================================================================
``{"$dict": [[k, v]]}``  a dict; keys are nodes too, so int keys (optimizer state) and order survive
``{"$odict": ..., "metadata": node}``  an OrderedDict, with ``state_dict()``'s ``_metadata`` when present
``{"$tuple": [...]}``    a tuple
``{"$float": "nan"}``    a non-finite float (``"nan"``, ``"inf"``, ``"-inf"``)
``{"$tensor": {...}}``   a dense torch tensor: dtype, shape, device, nbytes, and for parameters ``param``
``{"$ndarray": {...}}``  a numpy array or scalar: dtype descr, shape, nbytes, ``scalar``
``{"$bytes": n}``        a bytes object of n bytes
``{"$pickle": {...}}``   anything else, cloudpickled: ``type`` and nbytes; loading it needs ``allow_pickle``
=====================  ========================================================================================

Each tagged kind is one :class:`Codec` in a table: its tag, the types it encodes and its encode and decode
functions. Saving looks the codec up by the value's exact type (one dict lookup per node; a type no codec names
is offered to each codec's ``accepts`` once, then remembered), loading by the node's tag. A new kind of value is
one :func:`register_codec` call; the built-in codecs at the end of this module are the examples.

Buffers are laid out in the order a depth-first walk of the tree meets them, so a reader decodes the data in
one forward pass and can read each tensor straight into its final memory. Array bytes are C-contiguous; a
numpy array's are in the byte order its dtype descr names, a tensor's in the writing machine's (which the
archive's ``meta.json`` records as ``byteorder``).

Trade-off: tensors that shared storage when saved (views of one another) are stored and restored as separate
copies, as safetensors does; ``torch.save`` would keep the sharing.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import cloudpickle
import numpy as np
import torch

from bucketsnap.errors import BucketsnapError, CorruptSnapshotError, UnsafeLoadError

__all__ = [
    "MapLocation",
    "HostBuffer",
    "EncodedValue",
    "encode",
    "decode",
    "Codec",
    "Decoder",
    "Encoder",
    "register_codec",
]

MAGIC = b"BSNPVAL1"
_LEN = struct.Struct("<Q")
#: Headers above this size are refused: a structure this large is a malformed or hostile member.
MAX_HEADER_SIZE = 256 * 2**20
#: Members that decompress to more than this many bytes are refused before they are read: a small stored
#: member that claims a huge decompressed size is a zip bomb. Raise it (``bucketsnap._values.MAX_MEMBER_SIZE =
#: ...``) to load larger members from a source you trust.
MAX_MEMBER_SIZE = 64 * 2**30

MapLocation = str | torch.device | dict[str, str] | Callable[[torch.Tensor, str], torch.Tensor] | None
#: ``host_buffer(nbytes)``: a flat ``torch.uint8`` CPU tensor of ``nbytes`` bytes that a host copy may fill.
HostBuffer = Callable[[int], torch.Tensor]


@dataclass
class EncodedValue:
    """A value split into its JSON header and the buffers it refers to."""

    header: bytes
    buffers: list[memoryview] = field(default_factory=list)
    pickled: bool = False

    @property
    def raw_size(self) -> int:
        return len(MAGIC) + _LEN.size + len(self.header) + sum(b.nbytes for b in self.buffers)

    def chunks(self) -> Iterator[memoryview | bytes]:
        """The raw payload, piece by piece, without joining the buffers."""
        yield MAGIC + _LEN.pack(len(self.header)) + self.header
        yield from self.buffers


def encode(value: Any, *, copy: bool = False, host_buffer: HostBuffer | None = None) -> EncodedValue:
    """Split ``value`` into a JSON tree and raw buffers; anything without a safe encoding is cloudpickled.

    Buffers are views of the caller's tensors and arrays, unless ``copy`` is set: then each buffer is a private
    host copy (device tensors are copied once, to the host), so the caller may change ``value`` right away.
    With ``copy`` and ``host_buffer``, CPU tensors and arrays are copied into ``host_buffer(nbytes)`` (reused
    memory, such as :mod:`bucketsnap._host_copies` hands out) instead of newly allocated memory.
    """
    encoder = Encoder(copy=copy, host_buffer=host_buffer)
    tree = encoder.node(value)
    header = json.dumps({"tree": tree, "data_size": encoder.offset}, separators=(",", ":"), allow_nan=False).encode()
    return EncodedValue(header, encoder.buffers, encoder.pickled)


def decode(
    stream: BinaryIO,
    *,
    map_location: MapLocation = None,
    allow_pickle: bool = False,
    where: str = "",
    max_size: int | None = None,
) -> Any:
    """Read one payload written by :func:`encode` from ``stream``.

    No buffer is allocated beyond ``max_size`` bytes in all (default :data:`MAX_MEMBER_SIZE`), whatever the
    header declares.

    Raises:
        CorruptSnapshotError: the payload is malformed.
        UnsafeLoadError: the payload holds a pickled value and ``allow_pickle`` is False.
    """
    head = _read_exact(stream, len(MAGIC) + _LEN.size, where)
    if head[: len(MAGIC)] != MAGIC:
        raise CorruptSnapshotError(f"{where}: not a bucketsnap value (bad magic {head[:8]!r})")
    (header_len,) = _LEN.unpack(head[len(MAGIC) :])
    budget = MAX_MEMBER_SIZE if max_size is None else max_size
    if header_len > min(MAX_HEADER_SIZE, budget):
        raise CorruptSnapshotError(f"{where}: header of {header_len} bytes exceeds the {MAX_HEADER_SIZE} limit")
    try:
        header = json.loads(_read_exact(stream, header_len, where))
        tree = header["tree"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise CorruptSnapshotError(f"{where}: malformed value header: {type(exc).__name__}: {exc}") from exc
    decoder = Decoder(stream, map_location, allow_pickle, where, budget - header_len)
    try:
        return decoder.node(tree)
    except BucketsnapError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CorruptSnapshotError(f"{where}: malformed value: {type(exc).__name__}: {exc}") from exc


# -- the codec table ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """One kind of value: which values it encodes, the node it writes for them, and how that node decodes.

    Attributes:
        tag: the node's key in the archive (``"$tensor"``); a node is decoded by the codec of its tag.
        encode: ``encode(encoder, value)``: the node for ``value`` (its children through ``encoder.node``, its
            raw bytes through ``encoder.add``), or None to have ``value`` pickled instead.
        decode: ``decode(decoder, node)``: the value of a node holding ``tag`` (the whole JSON object).
        types: the exact types encoded, looked up in a dict (subclasses are not included).
        accepts: for types outside every codec's ``types``: whether this codec encodes values of that type
            (asked once per type; the answer is kept).
    """

    tag: str
    encode: Callable[[Encoder, Any], Any]
    decode: Callable[[Decoder, dict[str, Any]], Any]
    types: tuple[type, ...] = ()
    accepts: Callable[[type], bool] | None = None


#: Tag -> codec, in the order they were registered: a node with two keys is decoded by the first codec whose tag
#: it holds. Replaced, never mutated, by :func:`register_codec`, so that a reader never sees it half-updated.
_CODECS: dict[str, Codec] = {}
#: Type -> codec of every type met so far (the ``types`` of each codec, then what ``accepts`` decided).
_BY_TYPE: dict[type, Codec] = {}
#: JSON's own scalars: written as they are.
_JSON = frozenset({type(None), bool, int, str})
_isfinite = math.isfinite


def register_codec(codec: Codec) -> None:
    """Add a kind of value to the format, as one table entry: its tag, its types and its two functions.

    An archive holding the new tag is read only where the same codec is registered: elsewhere its load fails
    with :class:`~bucketsnap.errors.CorruptSnapshotError` ("unknown node type").

    Raises:
        ValueError: the tag, or one of the types, already has a codec.
    """
    global _CODECS, _BY_TYPE
    if codec.tag in _CODECS:
        raise ValueError(f"a codec for {codec.tag!r} is already registered")
    claimed = {t: c.tag for c in _CODECS.values() for t in c.types}
    taken = [f"{t.__qualname__} ({claimed[t]})" for t in codec.types if t in claimed]
    if taken:
        raise ValueError(f"these types already have a codec: {', '.join(taken)}")
    codecs = {**_CODECS, codec.tag: codec}
    _CODECS = codecs
    _BY_TYPE = {t: c for c in codecs.values() for t in c.types}  # what accepts decided may differ now


def _codec_of(t: type) -> Codec:
    """The codec of a type outside every codec's ``types``: the first that accepts it, else pickle."""
    codec = next((c for c in _CODECS.values() if c.accepts is not None and c.accepts(t)), _CODECS[_PICKLE])
    _BY_TYPE[t] = codec
    return codec


class Encoder:
    """One value being encoded: the buffers its tree refers to, in the order the tree meets them."""

    def __init__(self, *, copy: bool = False, host_buffer: HostBuffer | None = None) -> None:
        self.copy = copy
        self.host_buffer = host_buffer if copy else None
        self.buffers: list[memoryview] = []
        self.offset = 0
        self.pickled = False

    def add(self, buffer: memoryview) -> int:
        """Append ``buffer`` to the data; return its size, which the node records."""
        self.buffers.append(buffer)
        self.offset += buffer.nbytes
        return buffer.nbytes

    def node(self, v: Any) -> Any:
        """The node of ``v``: the hot path of a save, so dispatch is one dict lookup by exact type."""
        t = type(v)
        if t in _JSON or (t is float and _isfinite(v)):  # JSON's own (a non-finite float is the $float codec's)
            return v
        if t is list:
            return [self.node(x) for x in v]
        codec = _BY_TYPE.get(t) or _codec_of(t)
        node = codec.encode(self, v)
        return node if node is not None else self.pickle(v)

    def pickle(self, v: Any) -> dict[str, Any]:
        self.pickled = True
        data = cloudpickle.dumps(v)
        kind = f"{type(v).__module__}.{type(v).__qualname__}"
        return {_PICKLE: {"type": kind, "nbytes": self.add(memoryview(data))}}


class Decoder:
    """One payload being decoded, read forward from its stream within its declared size."""

    def __init__(
        self, stream: BinaryIO, map_location: MapLocation, allow_pickle: bool, where: str, budget: int
    ) -> None:
        self.stream = stream
        self.map_location = map_location
        self.allow_pickle = allow_pickle
        self.where = where
        self.budget = budget

    def take(self, nbytes: int) -> int:
        """Reserve ``nbytes`` of the payload before allocating them: a header cannot make us allocate more."""
        if nbytes < 0 or nbytes > self.budget:
            raise CorruptSnapshotError(
                f"{self.where}: a value of {nbytes} bytes is more than the member's declared size allows "
                f"({self.budget} bytes left, limit bucketsnap._values.MAX_MEMBER_SIZE = {MAX_MEMBER_SIZE})"
            )
        self.budget -= nbytes
        return nbytes

    def read(self, nbytes: int) -> bytes:
        """The next ``nbytes`` of the data, reserved first (see :meth:`take`)."""
        return _read_exact(self.stream, self.take(nbytes), self.where)

    def readinto(self, view: memoryview) -> None:
        """Fill ``view`` from the data; reserve its size with :meth:`take` before allocating it."""
        _readinto_exact(self.stream, view, self.where)

    def node(self, n: Any) -> Any:
        if n is None or isinstance(n, (bool, int, float, str)):
            return n
        if isinstance(n, list):
            return [self.node(x) for x in n]
        if not isinstance(n, dict) or len(n) not in (1, 2):
            raise CorruptSnapshotError(f"{self.where}: malformed node {str(n)[:80]}")
        # one key (every node but an OrderedDict with metadata): its tag's codec; two: the first in table order
        codec = _CODECS.get(next(iter(n))) if len(n) == 1 else next((c for t, c in _CODECS.items() if t in n), None)
        if codec is None:
            raise CorruptSnapshotError(f"{self.where}: unknown node type {sorted(n)}")
        return codec.decode(self, n)

    def key(self, k: Any) -> Any:
        key = self.node(k)
        if isinstance(key, (list, dict)):
            raise CorruptSnapshotError(f"{self.where}: unhashable dict key")
        return key

    def place(self, t: torch.Tensor, saved_device: str) -> torch.Tensor:
        loc = self.map_location
        if callable(loc) and not isinstance(loc, (str, torch.device)):
            return loc(t, saved_device)
        if isinstance(loc, dict):
            target: str | torch.device = loc.get(saved_device, saved_device)
        elif loc is None:
            target = saved_device
        else:
            target = loc
        target = torch.device(target)
        if target.type == "cpu":
            return t
        if target.type == "cuda" and not torch.cuda.is_available():
            raise BucketsnapError(
                f"{self.where}: tensor was saved on {saved_device} but CUDA is not available here; "
                "pass map_location='cpu'"
            )
        return t.to(target)


# -- the built-in codecs, one pair of functions each ----------------------------------------------------------


def _encode_dict(enc: Encoder, v: dict[Any, Any]) -> Any:
    return {"$dict": [[enc.node(k), enc.node(x)] for k, x in v.items()]}


def _decode_dict(dec: Decoder, n: dict[str, Any]) -> Any:
    return {dec.key(k): dec.node(x) for k, x in n["$dict"]}


def _encode_odict(enc: Encoder, v: OrderedDict[Any, Any]) -> Any:
    out: dict[str, Any] = {"$odict": [[enc.node(k), enc.node(x)] for k, x in v.items()]}
    metadata = getattr(v, "_metadata", None)
    if metadata is not None:
        out["metadata"] = enc.node(metadata)
    return out


def _decode_odict(dec: Decoder, n: dict[str, Any]) -> Any:
    od: OrderedDict[Any, Any] = OrderedDict((dec.key(k), dec.node(x)) for k, x in n["$odict"])
    if "metadata" in n:
        od._metadata = dec.node(n["metadata"])  # type: ignore[attr-defined]
    return od


def _encode_tuple(enc: Encoder, v: tuple[Any, ...]) -> Any:
    return {"$tuple": [enc.node(x) for x in v]}


def _decode_tuple(dec: Decoder, n: dict[str, Any]) -> Any:
    return tuple(dec.node(x) for x in n["$tuple"])


def _encode_float(enc: Encoder, v: float) -> Any:
    return v if math.isfinite(v) else {"$float": repr(v)}


def _decode_float(dec: Decoder, n: dict[str, Any]) -> Any:
    return float(n["$float"])


def _encode_bytes(enc: Encoder, v: bytes) -> Any:
    return {"$bytes": enc.add(memoryview(v))}


def _decode_bytes(dec: Decoder, n: dict[str, Any]) -> Any:
    return dec.read(int(n["$bytes"]))


def _encode_tensor(enc: Encoder, v: torch.Tensor) -> Any:
    if v.layout != torch.strided or v.is_quantized or v.is_nested or v.device.type == "meta":
        return None
    spec: dict[str, Any] = {
        "dtype": str(v.dtype).removeprefix("torch."),
        "shape": list(v.shape),
        "device": str(v.device),
    }
    if isinstance(v, torch.nn.Parameter):
        spec["param"] = True
        spec["requires_grad"] = v.requires_grad
    data = v.detach()
    if enc.host_buffer is not None and data.device.type == "cpu" and data.numel():
        # copy_ resolves conj and neg bits and any strides itself: one pass, into memory already touched
        buffer = enc.host_buffer(data.numel() * data.element_size())
        buffer.view(data.dtype).view(data.shape).copy_(data)
        spec["nbytes"] = enc.add(buffer.numpy().data)
        return {"$tensor": spec}
    if data.device.type != "cpu":
        data = data.cpu()  # a copy already
    data = data.resolve_conj().resolve_neg().contiguous()
    if enc.copy and data.untyped_storage().data_ptr() == v.untyped_storage().data_ptr():
        data = data.clone()
    spec["nbytes"] = enc.add(data.reshape(-1).view(torch.uint8).numpy().data)
    return {"$tensor": spec}


def _decode_tensor(dec: Decoder, n: dict[str, Any]) -> torch.Tensor:
    spec = n["$tensor"]
    dtype = getattr(torch, spec["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptSnapshotError(f"{dec.where}: unknown tensor dtype {spec['dtype']!r}")
    shape = [int(d) for d in spec["shape"]]
    nbytes = int(spec["nbytes"])
    if min(shape, default=0) < 0 or nbytes != math.prod(shape) * dtype.itemsize:
        raise CorruptSnapshotError(f"{dec.where}: tensor of shape {shape} declares {nbytes} bytes")
    dec.take(nbytes)
    t = torch.empty(shape, dtype=dtype)
    if nbytes:
        dec.readinto(t.reshape(-1).view(torch.uint8).numpy().data)
    t = dec.place(t, str(spec.get("device", "cpu")))
    if spec.get("param"):
        return torch.nn.Parameter(t, requires_grad=bool(spec.get("requires_grad", True)))
    return t


def _is_ndarray(t: type) -> bool:
    return issubclass(t, (np.ndarray, np.generic)) and t is not np.matrix


def _encode_ndarray(enc: Encoder, v: np.ndarray | np.generic) -> Any:
    scalar = isinstance(v, np.generic)
    array = np.asarray(v)
    if enc.host_buffer is not None and array.nbytes and array.dtype.fields is None and not array.dtype.hasobject:
        # the buffer seen as the array's own dtype and shape: copyto writes C order, byte for byte (not for
        # structured dtypes: copyto copies their fields, leaving padding bytes as the reused buffer had them)
        pooled = enc.host_buffer(array.nbytes).numpy().view(array.dtype).reshape(array.shape)
        np.copyto(pooled, array, casting="no")
        array = pooled
    elif not array.flags.c_contiguous or (enc.copy and np.may_share_memory(array, v)):
        if array.dtype.fields is not None:  # numpy copies a structured array's fields, not its padding
            padded, array = array, np.zeros(array.shape, array.dtype)
            np.copyto(array, padded)  # so the padding saved is zeros, not stale memory
        else:
            array = array.copy(order="C")  # ascontiguousarray would turn a 0-d array into 1-d
    if array.dtype.hasobject:
        return None
    try:
        descr = np.lib.format.dtype_to_descr(array.dtype)
    except ValueError:  # fields that overlap or are out of order: no descr says where each field lies
        return None
    spec = {
        "dtype": descr,
        "shape": list(array.shape),
        "scalar": scalar,
        "nbytes": enc.add(array.reshape(-1).view(np.uint8).data),
    }
    return {"$ndarray": spec}


def _decode_ndarray(dec: Decoder, n: dict[str, Any]) -> np.ndarray | np.generic:
    spec = n["$ndarray"]
    descr = spec["dtype"]
    dtype = np.lib.format.descr_to_dtype(_descr_from_json(descr))
    if dtype.hasobject:
        raise CorruptSnapshotError(f"{dec.where}: object arrays are never decoded without pickle")
    shape = tuple(int(d) for d in spec["shape"])
    nbytes = int(spec["nbytes"])
    if min(shape, default=0) < 0 or nbytes != math.prod(shape) * dtype.itemsize:
        raise CorruptSnapshotError(f"{dec.where}: array of shape {shape} declares {nbytes} bytes")
    dec.take(nbytes)
    array = np.empty(shape, dtype=dtype)
    if nbytes:
        dec.readinto(array.reshape(-1).view(np.uint8).data)
    return array[()] if spec.get("scalar") else array


def _descr_from_json(descr: Any) -> Any:
    """A structured dtype's descr as numpy wants it back: JSON turned its fields and ``(title, name)`` pairs
    into lists."""
    if isinstance(descr, str):
        return descr
    fields = []
    for name, sub, *shape in descr:
        fields.append((tuple(name) if isinstance(name, list) else name, _descr_from_json(sub), *map(tuple, shape)))
    return fields


def _decode_pickle(dec: Decoder, n: dict[str, Any]) -> Any:
    spec = n[_PICKLE]
    nbytes = int(spec["nbytes"])
    if not dec.allow_pickle:
        raise UnsafeLoadError(
            f"{dec.where} holds a pickled {spec.get('type', 'object')}; unpickling runs code from the "
            "snapshot. Pass allow_pickle=True only if you trust where it came from, or load other keys."
        )
    return cloudpickle.loads(dec.read(nbytes))


_PICKLE = "$pickle"

# The order is the format's: a two-key node is decoded by the first codec whose tag it holds.
for _codec in (
    Codec("$dict", _encode_dict, _decode_dict, types=(dict,)),
    Codec("$odict", _encode_odict, _decode_odict, types=(OrderedDict,)),
    Codec("$tuple", _encode_tuple, _decode_tuple, types=(tuple,)),
    Codec("$float", _encode_float, _decode_float, types=(float,)),
    Codec("$bytes", _encode_bytes, _decode_bytes, types=(bytes,)),
    # exact types only: a tensor subclass may carry state the bytes do not, so it is pickled
    Codec("$tensor", _encode_tensor, _decode_tensor, types=(torch.Tensor, torch.nn.Parameter)),
    Codec("$ndarray", _encode_ndarray, _decode_ndarray, types=(np.ndarray,), accepts=_is_ndarray),
    # anything else: never chosen by type, only when no other codec takes a value
    Codec(_PICKLE, lambda enc, v: enc.pickle(v), _decode_pickle),
):
    register_codec(_codec)
del _codec


def _read_exact(stream: BinaryIO, n: int, where: str) -> bytes:
    out = bytearray(n)
    _readinto_exact(stream, memoryview(out), where)
    return bytes(out)


def _readinto_exact(stream: Any, view: memoryview, where: str) -> None:
    got = 0
    total = view.nbytes
    while got < total:
        n = stream.readinto(view[got:])
        if not n:
            raise CorruptSnapshotError(f"{where}: truncated: expected {total} bytes, got {got}")
        got += n
