"""docs/format.md is a spec another implementation can follow: a decoder written from it alone reads what
bucketsnap writes.

The first half of this file is that decoder. It imports nothing of bucketsnap (nor torch): only ``zipfile``,
``json``, ``struct``, ``zlib``, ``hashlib``/``blake3``, ``zstandard`` and numpy, and it follows docs/format.md
and docs/protocol.md (the manifest, to find a run's last snapshot). Its tensor widths come from the dtype table
of docs/format.md itself. The tests in the second half save real snapshots with bucketsnap (state dicts of
every torch dtype, structured numpy arrays, nested containers with int and tuple keys, replay buffers) and
check that the decoder finds exactly what ``SnapshotStore.load`` returns, value for value and byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
import zstandard

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "format.md"

# == the independent decoder: docs/format.md and docs/protocol.md, nothing else ================================


def documented_tensor_widths() -> dict[str, int]:
    """The "Tensor dtypes" table of docs/format.md: dtype name -> bytes per element."""
    text = FORMAT_MD.read_text()
    section = text.split("### Tensor dtypes", 1)[1].split("\n### ", 1)[0]
    widths: dict[str, int] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].isdigit():
            continue
        names = re.findall(r"`([a-z0-9_]+)`", cells[0])
        if "..." in cells[0]:  # `uint1` ... `uint7`: the whole range
            ranges = re.findall(r"`([a-z]+)1` \.\.\. `\1(\d)`", cells[0])
            names = [f"{base}{i}" for base, last in ranges for i in range(1, int(last) + 1)]
        for name in names:
            widths[name] = int(cells[1])
    return widths


WIDTHS = documented_tensor_widths()


@dataclass
class Tensor:
    """A ``$tensor`` node with its bytes."""

    dtype: str
    shape: list[int]
    device: str
    data: bytes
    byteorder: str
    param: bool = False
    requires_grad: bool | None = None

    def values(self) -> np.ndarray:
        """The elements as numpy values, by the table's layouts (float8/bfloat16 as float64)."""
        order = "<" if self.byteorder == "little" else ">"
        plain = {
            "bool": "|b1", "uint8": "|u1", "int8": "|i1", "uint16": "u2", "int16": "i2", "uint32": "u4",
            "int32": "i4", "uint64": "u8", "int64": "i8", "float16": "f2", "float32": "f4", "float64": "f8",
            "complex64": "c8", "complex128": "c16",
        }  # fmt: skip
        if self.dtype in plain:
            code = plain[self.dtype]
            return np.frombuffer(self.data, code if code[0] == "|" else order + code).reshape(self.shape)
        if self.dtype == "bfloat16":  # the upper half of a binary32
            words = np.frombuffer(self.data, order + "u2").astype(np.uint32) << 16
            return words.view(np.float32).astype(np.float64).reshape(self.shape)
        if self.dtype == "complex32":  # real, imaginary: two float16
            parts = np.frombuffer(self.data, order + "f2")
            out = np.empty(len(parts) // 2, np.complex128)
            out.real, out.imag = parts[0::2], parts[1::2]
            return out.reshape(self.shape)
        if self.dtype in MINIFLOATS:
            return minifloat(np.frombuffer(self.data, np.uint8), *MINIFLOATS[self.dtype]).reshape(self.shape)
        if self.dtype == "float8_e8m0fnu":  # 2^(e - 127), 0xff NaN
            e = np.frombuffer(self.data, np.uint8).astype(np.float64)
            return np.where(e == 255, np.nan, np.exp2(e - 127)).reshape(self.shape)
        raise NotImplementedError(self.dtype)


#: name -> (exponent bits, fraction bits, bias, NaN rule): "ieee" (all-ones exponent: inf or NaN), "fn" (only
#: all-ones exponent and fraction is NaN, no infinities), "fnuz" (0x80 is the only NaN: no negative zero)
MINIFLOATS = {
    "float8_e4m3fn": (4, 3, 7, "fn"),
    "float8_e4m3fnuz": (4, 3, 8, "fnuz"),
    "float8_e5m2": (5, 2, 15, "ieee"),
    "float8_e5m2fnuz": (5, 2, 16, "fnuz"),
}


def minifloat(raw: np.ndarray, ebits: int, mbits: int, bias: int, rule: str) -> np.ndarray:
    sign = np.where(raw >> (ebits + mbits) & 1, -1.0, 1.0)
    e = (raw >> mbits & (2**ebits - 1)).astype(np.int64)
    f = (raw & (2**mbits - 1)).astype(np.float64)
    value = sign * np.where(e > 0, np.exp2(e - bias) * (1 + f / 2**mbits), 2.0 ** (1 - bias) * f / 2**mbits)
    top = e == 2**ebits - 1
    if rule == "ieee":
        value = np.where(top, np.where(f == 0, sign * np.inf, np.nan), value)
    elif rule == "fn":
        value = np.where(top & (f == 2**mbits - 1), np.nan, value)
    else:
        value = np.where(raw == 0x80, np.nan, value)
    return value


class ODict(OrderedDict):  # type: ignore[type-arg]
    """An ``$odict`` node, with its ``metadata``."""

    metadata: Any = None


@dataclass
class Pickled:
    """A ``$pickle`` node: skipped, never unpickled."""

    type: str
    data: bytes


def numpy_dtype(descr: Any) -> np.dtype[Any]:
    """A descr as format.md's "numpy dtypes" says: a type string, or a list of fields in offset order."""
    if isinstance(descr, str):
        return np.dtype(descr)
    names, formats, offsets, titles, offset = [], [], [], [], 0
    for name, sub, *shape in descr:
        dtype = numpy_dtype(sub)
        if shape:
            dtype = np.dtype((dtype, tuple(shape[0])))
        title, name = name if isinstance(name, (list, tuple)) else (None, name)  # tuples: in a chunk table
        if name != "":  # "" is padding
            names.append(name)
            formats.append(dtype)
            offsets.append(offset)
            titles.append(title)
        offset += dtype.itemsize
    spec: dict[str, Any] = {"names": names, "formats": formats, "offsets": offsets, "itemsize": offset}
    if any(t is not None for t in titles):
        spec["titles"] = titles
    return np.dtype(spec)


class Payload:
    """One member's decompressed payload: magic, header length, JSON header, data in walk order."""

    def __init__(self, raw: bytes, byteorder: str) -> None:
        assert raw[:8] == b"BSNPVAL1"
        (length,) = struct.unpack("<Q", raw[8:16])
        header = json.loads(raw[16 : 16 + length])
        self.data = memoryview(raw)[16 + length :]
        assert len(self.data) == header["data_size"]
        self.pos = 0
        self.byteorder = byteorder
        self.value = self.node(header["tree"])
        assert self.pos == len(self.data), "the walk did not consume the data"

    def take(self, n: int) -> bytes:
        out = bytes(self.data[self.pos : self.pos + n])
        assert len(out) == n
        self.pos += n
        return out

    def node(self, n: Any) -> Any:
        if n is None or isinstance(n, (bool, int, float, str)):
            return n
        if isinstance(n, list):
            return [self.node(x) for x in n]
        if "$dict" in n:
            return {self.node(k): self.node(v) for k, v in n["$dict"]}  # key, then value
        if "$odict" in n:
            od = ODict((self.node(k), self.node(v)) for k, v in n["$odict"])
            if "metadata" in n:  # after the pairs
                od.metadata = self.node(n["metadata"])
            return od
        if "$tuple" in n:
            return tuple(self.node(x) for x in n["$tuple"])
        if "$float" in n:
            return float(n["$float"])
        if "$bytes" in n:
            return self.take(n["$bytes"])
        if "$tensor" in n:
            spec = n["$tensor"]
            assert spec["nbytes"] == math.prod(spec["shape"]) * WIDTHS[spec["dtype"]]
            data = self.take(spec["nbytes"])
            return Tensor(
                spec["dtype"], spec["shape"], spec["device"], data, self.byteorder,
                spec.get("param", False), spec.get("requires_grad"),
            )  # fmt: skip
        if "$ndarray" in n:
            spec = n["$ndarray"]
            dtype = numpy_dtype(spec["dtype"])
            assert spec["nbytes"] == math.prod(spec["shape"]) * dtype.itemsize
            array = np.frombuffer(self.take(spec["nbytes"]), dtype).reshape(spec["shape"])
            return array[()] if spec["scalar"] else array
        if "$pickle" in n:
            return Pickled(n["$pickle"]["type"], self.take(n["$pickle"]["nbytes"]))
        raise ValueError(f"unknown node {n}")


class Run:
    """A run directory on local disk, read as docs/protocol.md and docs/format.md say."""

    def __init__(self, root: Path) -> None:
        self.root = root
        generations = [p for p in (root / "manifest").iterdir() if re.fullmatch(r"\d{12}\.json", p.name)]
        self.manifest = json.loads(max(generations).read_text())
        assert self.manifest["format"] == "bucketsnap-manifest"

    def entry(self, itr: int | None = None) -> dict[str, Any]:
        snapshots = self.manifest["snapshots"]  # ascending by itr
        return snapshots[-1] if itr is None else next(s for s in snapshots if s["itr"] == itr)

    def meta(self, entry: dict[str, Any]) -> dict[str, Any]:
        with zipfile.ZipFile(self.root / entry["path"]) as archive:  # through the central directory
            return json.loads(archive.read("meta.json"))

    def member(self, entry: dict[str, Any], key: str) -> Any:
        m = entry["members"][key]
        stored = (self.root / m.get("path", entry["path"])).read_bytes()[m["offset"] : m["offset"] + m["stored_size"]]
        assert f"{zlib.crc32(stored):08x}" == m["crc32"]
        raw = unzstd(stored)
        assert len(raw) == m["raw_size"]
        return Payload(raw, self.meta(entry).get("byteorder", "little")).value  # absent: little

    def load(self, itr: int | None = None) -> dict[str, Any]:
        entry = self.entry(itr)
        return {key: self.member(entry, key) for key in entry["members"]}

    def buffer(self, table: dict[str, Any]) -> dict[str, np.ndarray]:
        """A chunk table's fields, rows [0, rows), put together from its chunks."""
        assert table["format"] in ("bucketsnap.chunked/1", "bucketsnap.chunked/2", "bucketsnap.chunked/3")
        digest = {"sha256": hashlib.sha256, "blake3": blake3.blake3}[table.get("hash", "sha256")]
        fields = [(f["name"], numpy_dtype(f["dtype"]), tuple(f["shape"])) for f in table["fields"]]
        parts: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in fields}
        for chunk in table["chunks"]:
            path = chunk.get("path", f"chunks/{chunk['id']}.zst")
            stored = (self.root / path).read_bytes()
            assert len(stored) == chunk["stored_size"]
            assert int(path.split("-")[1], 16) == zlib.crc32(stored)  # chunks/<id>-<crc32>-<token>.zst
            raw = unzstd(stored)
            assert digest(raw).hexdigest() == chunk["id"]  # the hash of what the object decompresses to
            if path.endswith(".shift.zst"):
                assert table["format"] == "bucketsnap.chunked/3"
                raw = unshift(raw, chunk["raw_size"])
            assert len(raw) == chunk["raw_size"]
            at = 0
            for name, dtype, shape in fields:  # field after field, C order
                n = chunk["rows"] * math.prod(shape) * dtype.itemsize
                parts[name].append(np.frombuffer(raw[at : at + n], dtype).reshape(chunk["rows"], *shape))
                at += n
            assert at == len(raw)
        out = {name: np.concatenate(parts[name]) for name, _, _ in fields}
        assert all(len(a) == table["rows"] for a in out.values())
        return out


def unshift(body: bytes, raw_size: int) -> bytes:
    """A shifted-rows chunk's raw bytes, rebuilt from what its frame decompresses to (the header, then records)."""
    assert body[:8] == b"BSSHIFT1"
    (count,) = struct.unpack_from("<I", body, 8)
    at = 12
    regions = []
    for _ in range(count):
        regions.append(struct.unpack_from("<4Q", body, at))
        at += 32
    raw = bytearray()
    for source, target, row_bytes, rows in regions:
        assert source + rows * row_bytes <= target and len(raw) <= target
        plain = target - len(raw)  # the raw bytes before the region, as they are
        raw += body[at : at + plain]
        at += plain
        r = 0
        while r < rows:
            (word,) = struct.unpack_from("<Q", body, at)
            at += 8
            k = word >> 1
            assert k >= 1 and r + k <= rows
            if word & 1:
                raw += body[at : at + k * row_bytes]
                at += k * row_bytes
            else:
                assert r + k < rows  # never the region's last row
                for i in range(r, r + k):
                    raw += raw[source + (i + 1) * row_bytes : source + (i + 2) * row_bytes]
            r += k
    raw += body[at:]
    assert len(raw) == raw_size
    return bytes(raw)


def unzstd(data: bytes) -> bytes:
    """Every zstd frame of ``data``, decompressed in sequence."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    return reader.read()


# == the tests: bucketsnap writes, the decoder above reads =====================================================

torch = pytest.importorskip("torch")

from bucketsnap import SnapshotStore  # noqa: E402
from bucketsnap.buffers import (  # noqa: E402
    BufferKind,
    BufferState,
    TransitionStorage,
    buffer_state,
    register_buffer_kind,
    restore_buffer,
)


def encodable_dtypes() -> list[Any]:
    """Every dtype of this torch that the encoder writes as a ``$tensor`` (quantized ones are pickled)."""
    dtypes = {d for d in vars(torch).values() if isinstance(d, torch.dtype)}
    return sorted((d for d in dtypes if not re.search(r"\bq(u)?int", name(d))), key=str)


def name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def test_the_dtype_table_lists_every_dtype_the_encoder_takes_with_its_width() -> None:
    for dtype in encodable_dtypes():
        assert WIDTHS.get(name(dtype)) == dtype.itemsize, name(dtype)
    assert len(WIDTHS) == len(encodable_dtypes())


def same(decoded: Any, loaded: Any, where: str = "value") -> None:
    """``decoded`` (the independent decoder's) is what bucketsnap loaded, structure, order and bytes."""
    if isinstance(loaded, torch.Tensor):
        assert isinstance(decoded, Tensor), where
        assert (decoded.dtype, decoded.shape) == (name(loaded.dtype), list(loaded.shape)), where
        assert decoded.data == loaded.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), where
        assert decoded.param == isinstance(loaded, torch.nn.Parameter), where
        if decoded.param:
            assert decoded.requires_grad == loaded.requires_grad, where
    elif isinstance(loaded, (np.ndarray, np.generic)):
        assert type(decoded) is type(loaded) and decoded.dtype == loaded.dtype, where
        assert decoded.shape == loaded.shape and decoded.tobytes() == loaded.tobytes(), where
    elif isinstance(loaded, OrderedDict):
        assert isinstance(decoded, ODict) and list(decoded) == list(loaded), where
        for k in loaded:
            same(decoded[k], loaded[k], f"{where}[{k!r}]")
        same(decoded.metadata, getattr(loaded, "_metadata", None), f"{where}._metadata")
    elif isinstance(loaded, dict):
        assert type(decoded) is dict and list(decoded) == list(loaded), where  # keys, types and order
        for k in loaded:
            same(decoded[k], loaded[k], f"{where}[{k!r}]")
    elif isinstance(loaded, (list, tuple)):
        assert type(decoded) is type(loaded) and len(decoded) == len(loaded), where
        for i, (d, x) in enumerate(zip(decoded, loaded, strict=True)):
            same(d, x, f"{where}[{i}]")
    elif isinstance(loaded, float) and math.isnan(loaded):
        assert isinstance(decoded, float) and math.isnan(decoded), where
    else:
        assert type(decoded) is type(loaded) and decoded == loaded, where


def random_tensor(dtype: Any, shape: tuple[int, ...], seed: int) -> Any:
    """Random bits of ``dtype`` (every bit pattern, NaNs included), or 0/1 for bool."""
    raw = np.random.default_rng(seed).integers(0, 256, math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    if dtype == torch.bool:
        raw &= 1
    return torch.from_numpy(raw).view(dtype).reshape(shape)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_tensors_of_every_dtype_decode_with_the_documented_layouts(tmp_path: Path) -> None:
    dtypes = encodable_dtypes()
    state = {name(d): random_tensor(d, (3, 5), i) for i, d in enumerate(dtypes)}
    state["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)  # shape []: one element
    state["empty"] = torch.zeros(0, 4, dtype=torch.float8_e5m2)
    state["view"] = torch.arange(12, dtype=torch.int64).reshape(3, 4).t()  # saved C-contiguous
    store = SnapshotStore(str(tmp_path))
    store.save(1, {"tensors": state})

    decoded = Run(tmp_path).load()["tensors"]
    loaded = store.load("last")["tensors"]
    same(decoded, loaded)
    for key, tensor in loaded.items():
        dtype = decoded[key].dtype
        if dtype.startswith(("bits", "float4")) or re.fullmatch(r"u?int[1-7]", dtype):
            continue  # opaque, packed or sub-byte: torch has no arithmetic on them to compare with
        if tensor.is_floating_point() or tensor.is_complex():
            theirs = tensor.to(torch.complex128 if tensor.is_complex() else torch.float64).numpy()
        else:
            theirs = tensor.numpy()
        np.testing.assert_array_equal(decoded[key].values(), theirs, err_msg=key)  # NaNs in the same places


def test_a_module_and_an_optimizer_state_dict_decode_with_their_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 3)).sum().backward()
    optimizer.step()
    param = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    store = SnapshotStore(str(tmp_path))
    store.save(5, {"policy": model.state_dict(), "optimizer": optimizer.state_dict(), "param": param, "itr": 5})

    run = Run(tmp_path)
    decoded, loaded = run.load(), store.load(5)
    same(decoded, loaded)
    policy = decoded["policy"]
    assert isinstance(policy, ODict) and policy.metadata["1"] == {"version": 2}  # BatchNorm's version
    assert list(decoded["optimizer"]["state"]) == [0, 1, 2, 3, 4, 5]  # int keys survive
    assert decoded["param"].param and decoded["param"].requires_grad is False
    meta = run.meta(run.entry())
    assert meta["format_version"] == 1 and meta["byteorder"] in ("little", "big")


def test_numpy_arrays_and_structured_dtypes_decode_from_their_descrs(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)

    def filled(dtype: Any, n: int = 4) -> np.ndarray:
        array = np.zeros(n, dtype)  # padding zero, as the encoder writes it
        for name in array.dtype.names or ():
            array[name] = rng.integers(0, 100, array[name].shape).astype(array[name].dtype)
        return array

    arrays = {
        "nested": filled([("a", [("b", "<f4"), ("c", "u1", (2,))]), ("d", ">i8", (2, 3))]),
        "aligned": filled(np.dtype([("flag", "u1"), ("x", "<f8"), ("n", "<i2")], align=True)),
        "titled": filled(np.dtype({"names": ["x", "y"], "formats": ["<f4", "<i4"], "titles": ["the x", None]})),
        "big": rng.random((2, 3)).astype(">f8"),
        "bool": rng.random(5) > 0.5,
        "unicode": np.array(["ab", "xyz"], dtype="<U3"),
        "bytes": np.array([b"ab", b"c"], dtype="S3"),
        "dates": np.array(["2026-12-01", "1970-01-02"], dtype="M8[s]"),
        "complex": (rng.random(3) + 1j).astype("<c8"),
        "half": rng.random(3).astype("<f2"),
        "fortran": np.asfortranarray(rng.random((3, 2))),  # saved in C order
        "subarray": np.zeros(2, dtype=("<f4", (3,))),  # a top-level sub-array: shape (2, 3)
        "scalar": np.float32(1.5),
        "record": filled([("a", "<f4"), ("b", "<i2")], 1)[0],
    }
    out_of_order = np.dtype({"names": ["x", "y"], "formats": ["<f4", "u1"], "offsets": [4, 0], "itemsize": 8})
    store = SnapshotStore(str(tmp_path))
    store.save(1, {"arrays": arrays, "no_descr": np.ones(2, out_of_order)})
    decoded, loaded = Run(tmp_path).load()["arrays"], store.load(1, keys=["arrays"])["arrays"]
    same(decoded, loaded)
    assert isinstance(Run(tmp_path).load()["no_descr"], Pickled)  # no descr of format.md's form: pickled
    back = store.load(1, allow_pickle=True)["no_descr"]
    assert back.dtype == out_of_order and back["x"].tolist() == back["y"].tolist() == [1, 1]
    assert decoded["aligned"].dtype.itemsize == 24 and decoded["aligned"].dtype.fields["x"][1] == 8
    assert decoded["titled"].dtype.names == ("x", "y") and decoded["titled"].dtype.fields["the x"][1] == 0
    assert decoded["subarray"].shape == (2, 3)
    np.testing.assert_array_equal(decoded["fortran"], arrays["fortran"])


def test_nested_containers_decode_in_walk_order_key_before_value(tmp_path: Path) -> None:
    value = {
        7: (b"key-free bytes", [1, 2.5, None, True, "s"]),
        (b"tuple key with bytes", 3): torch.arange(3),  # the key's buffer comes before the value's
        b"bytes key": {0: {1: (torch.ones(2), ())}, -1: []},
        "floats": (math.nan, math.inf, -math.inf, -0.0, 2**70),
        "pickled": {1, 2, 3},  # no safe encoding: its bytes take their place, the decoder skips them
        "after": torch.full((2,), 9, dtype=torch.int16),
        "odict": OrderedDict([("z", torch.zeros(1)), ("a", b"\x00\x01")]),
    }
    value["odict"]._metadata = {"": {"version": 1, "blob": b"metadata bytes"}}  # type: ignore[attr-defined]
    store = SnapshotStore(str(tmp_path))
    store.save(1, {"nested": value, "top": (1, {2: 3})})
    decoded = Run(tmp_path).load()
    loaded = store.load(1, allow_pickle=True)
    pickled = decoded["nested"].pop("pickled")
    assert isinstance(pickled, Pickled) and pickled.type == "builtins.set"
    assert loaded["nested"].pop("pickled") == {1, 2, 3}
    same(decoded, loaded)
    assert decoded["nested"]["odict"].metadata[""]["blob"] == b"metadata bytes"


def test_a_replay_buffer_decodes_from_its_chunk_table_in_ring_order(tmp_path: Path) -> None:
    storage = TransitionStorage(50)
    for step in range(70):  # wraps around: rows 0-19 hold steps 50-69
        obs = np.array([step, -step, step * 0.5], dtype=np.float32)
        storage.insert_transition({"obs": obs, "action": step % 4, "frame": np.full((2, 2), step % 256, np.uint8)})
    store = SnapshotStore(str(tmp_path))
    store.save(70, {"replay_buffer": buffer_state(storage, chunk_rows=16), "step": 70})

    run = Run(tmp_path)
    entry = run.entry()
    table = run.member(entry, "replay_buffer")
    assert table["format"].startswith("bucketsnap.chunked/") and table["kind"] == "bucketsnap.TransitionStorage"
    assert table["rows"] == 50 and table["chunk_rows"] == 16 and [c["rows"] for c in table["chunks"]] == [16, 16, 16, 2]
    assert sorted(c["path"] for c in table["chunks"]) == sorted(entry["refs"])
    assert table["attrs"] == {"pos": 20, "full": True, "size": 50}
    fields = run.buffer(table)
    for name, tensor in storage.data.items():
        np.testing.assert_array_equal(fields[name], tensor.numpy(), err_msg=name)
    pos = table["attrs"]["pos"]
    in_time = np.concatenate([fields["obs"][pos:], fields["obs"][:pos]])  # oldest first, as format.md says
    np.testing.assert_array_equal(in_time[:, 0], np.arange(20, 70, dtype=np.float32))
    assert fields["frame"].shape == (50, 2, 2)


def test_an_sb3_replay_buffer_decodes_with_its_fields_and_counters(tmp_path: Path) -> None:
    gymnasium = pytest.importorskip("gymnasium")
    buffers = pytest.importorskip("stable_baselines3.common.buffers")
    space = gymnasium.spaces.Box(0, 255, (32, 64), np.uint8)  # 4 KiB a row of 2 envs: stored shifted
    buffer = buffers.ReplayBuffer(32, space, gymnasium.spaces.Discrete(3), device="cpu", n_envs=2)
    for i in range(40):
        obs = np.full((2, 32, 64), i, np.uint8)
        ended = np.full((2, 32, 64), 200, np.uint8)  # an episode's last observation: not the next row's
        buffer.add(obs, obs + 1 if i % 5 else ended, np.array([[i % 3], [0]]), np.array([1.0, 2.0]),
                   np.array([False, i % 7 == 0]), [{}, {}])  # fmt: skip
    store = SnapshotStore(str(tmp_path))
    store.save(1, {"replay_buffer": buffer_state(buffer, chunk_rows=10)})

    run = Run(tmp_path)
    table = run.member(run.entry(), "replay_buffer")
    assert table["kind"] == "sb3.ReplayBuffer" and table["attrs"]["pos"] == 8 and table["attrs"]["full"] is True
    assert [f["name"] for f in table["fields"]] == [
        "observations", "next_observations", "actions", "rewards", "dones", "timeouts",
    ]  # fmt: skip
    assert table["attrs"]["n_envs"] == 2 and table["fields"][0]["shape"] == [2, 32, 64]
    # next_observations repeat the next row of observations (but where an episode ended): stored once
    assert table["format"] == "bucketsnap.chunked/3"
    assert all(c["path"].endswith(".shift.zst") for c in table["chunks"])
    fields = run.buffer(table)
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        np.testing.assert_array_equal(fields[name], getattr(buffer, name), err_msg=name)


class Records:
    """A buffer of structured rows, saved by a kind of its own."""

    def __init__(self) -> None:
        dtype = np.dtype({"names": ["x", "n"], "formats": ["<f4", ("<i2", (2,))], "titles": ["the x", None]})
        self.rows = np.zeros(12, dtype)
        self.rows["x"] = np.arange(12)
        self.rows["n"] = np.arange(24).reshape(12, 2)


class RecordsKind(BufferKind):
    name = "tests.Records"

    def matches(self, buffer: object) -> bool:
        return isinstance(buffer, Records)

    def state(self, buffer: Records) -> BufferState:
        return BufferState({"rows": buffer.rows}, rows=10, attrs={"count": 10})

    def restore(self, buffer: Records, saved: Any) -> None:
        saved.read_into({"rows": buffer.rows})


def test_a_buffer_of_structured_rows_decodes_from_its_tuple_descr(tmp_path: Path) -> None:
    register_buffer_kind(RecordsKind())
    records = Records()
    store = SnapshotStore(str(tmp_path))
    store.save(1, {"records": buffer_state(records, chunk_rows=4)})
    run = Run(tmp_path)
    table = run.member(run.entry(), "records")
    assert isinstance(table["fields"][0]["dtype"][0], tuple)  # a $tuple node, as format.md says
    fields = run.buffer(table)
    assert fields["rows"].dtype == records.rows.dtype and fields["rows"].tobytes() == records.rows[:10].tobytes()
    restored = Records()
    restored.rows[:] = 0
    restore_buffer(store, restored, key="records")
    assert restored.rows[:10].tobytes() == fields["rows"].tobytes()


def test_members_read_through_the_central_directory_are_the_ranges_the_manifest_names(tmp_path: Path) -> None:
    store = SnapshotStore(str(tmp_path))
    store.save(1, {"policy": {"w": torch.randn(64, 64)}, "zeros": torch.zeros(10_000), "n": 3})
    run = Run(tmp_path)
    entry = run.entry()
    data = (tmp_path / entry["path"]).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for key, m in entry["members"].items():
            info = archive.getinfo(m["name"])
            assert info.compress_type == zipfile.ZIP_STORED and info.file_size == m["stored_size"]
            # format.md: every <key>.zst entry's local header defers its sizes to a data descriptor (bit 3)
            (flags,) = struct.unpack("<H", data[info.header_offset + 6 : info.header_offset + 8])
            assert flags & 8, f"{key}: format.md says streaming zip readers cannot read it; update that section"
            assert archive.read(m["name"]) == data[m["offset"] : m["offset"] + m["stored_size"]], key
    meta_info = zipfile.ZipFile(io.BytesIO(data)).getinfo("meta.json")
    (flags,) = struct.unpack("<H", data[meta_info.header_offset + 6 : meta_info.header_offset + 8])
    assert not flags & 8, "meta.json has its sizes and CRC-32 in its local header"
    meta = run.meta(entry)
    assert {k: {f: v[f] for f in ("offset", "stored_size", "crc32")} for k, v in meta["members"].items()} == {
        k: {f: v[f] for f in ("offset", "stored_size", "crc32")} for k, v in entry["members"].items()
    }
    assert f"crc32:{zlib.crc32(data):08x}" == entry["checksums"][entry["path"]]
