"""Hostile and malformed inputs: a generated corpus of bad archives, payloads and manifests.

Every case must end in a typed bucketsnap error (or, where the damaged bytes are not needed, the correct value):
never a hang, an interpreter crash, an untyped exception, a huge allocation, or a write outside the run.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from fsspec.implementations.memory import MemoryFileSystem

from bucketsnap import (
    BucketsnapError,
    CorruptSnapshotError,
    SnapshotNotFoundError,
    SnapshotStore,
    UnsafeLoadError,
)
from bucketsnap import _values as values_mod
from bucketsnap._archive import FORMAT_VERSION, ArchiveWriter
from bucketsnap._manifest import MANIFEST_DIR, generation_name
from bucketsnap._saving import Prepared
from bucketsnap._values import MAGIC, EncodedValue
from bucketsnap._zipformat import read_directory

pytestmark = pytest.mark.timeout(120)

TYPED = (CorruptSnapshotError, SnapshotNotFoundError)


class RawPayload(EncodedValue):
    """A member whose decompressed payload is exactly ``payload`` (no magic or header added)."""

    def __init__(self, payload: bytes) -> None:
        super().__init__(b"")
        self.payload = payload

    @property
    def raw_size(self) -> int:  # type: ignore[override]
        return len(self.payload)

    def chunks(self) -> Iterator[bytes]:
        yield self.payload


def payload(header: Any, data: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(head)) + head + data


def commit_raw(store: SnapshotStore, itr: int, members: dict[str, bytes]) -> None:
    """Write and commit an archive whose members hold exactly these payloads."""
    store._write(Prepared(itr, {k: RawPayload(v) for k, v in members.items()}, {}, False))


def archive_bytes(store: SnapshotStore, itr: int = 1) -> bytes:
    return store.storage.read(store.info(itr).path)


def replace_archive(store: SnapshotStore, itr: int, data: bytes) -> None:
    path = store.storage.path(store.info(itr).path)
    store.storage.fs.pipe_file(path, data)


def write_generation(store: SnapshotStore, doc: Any, *, raw: bytes | None = None) -> None:
    generation = (store._log.generations() or [0])[-1] + 1
    data = raw if raw is not None else json.dumps(doc).encode()
    store.storage.fs.pipe_file(store.storage.path(generation_name(generation)), data)


def newest_doc(store: SnapshotStore) -> dict[str, Any]:
    generation = store._log.generations()[-1]
    return json.loads(store.storage.read(generation_name(generation)))  # type: ignore[no-any-return]


def expect_typed(fn: Callable[[], Any], match: str | None = None) -> BaseException:
    with pytest.raises(TYPED, match=match) as exc:
        fn()
    return exc.value


@pytest.fixture
def store(memory_backend: Any) -> SnapshotStore:
    return SnapshotStore(memory_backend.url("hostile"))


def saved(store: SnapshotStore) -> dict[str, Any]:
    state = {"policy": torch.arange(64, dtype=torch.float32), "step": 7, "blob": b"x" * 300}
    store.save(1, state)
    return state


# -- archives truncated at every structural boundary ------------------------------------------------------


def boundaries(data: bytes) -> list[int]:
    """Every offset where a zip structure starts or ends, and one byte either side."""
    points = {0, len(data)}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            points.add(info.header_offset)
            start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
            points |= {start, start + info.compress_size, start + info.compress_size + 16}
        cd = data.rfind(b"PK\x01\x02")
        while cd > 0:
            points.add(cd)
            cd = data.rfind(b"PK\x01\x02", 0, cd)
        points.add(data.rfind(b"PK\x05\x06"))
    return sorted({p + d for p in points for d in (-1, 0, 1) if 0 <= p + d < len(data)})


def test_truncated_at_every_boundary(store: SnapshotStore) -> None:
    state = saved(store)
    data = archive_bytes(store)
    cuts = boundaries(data)
    assert len(cuts) > 20
    for cut in cuts:
        truncated = data[:cut]
        replace_archive(store, 1, truncated)
        with pytest.raises(CorruptSnapshotError):
            read_directory(lambda s, e, t=truncated: t[s:e], len(truncated), where="t")  # type: ignore[misc]
        expect_typed(lambda: store.verify(1))
        for key in state:
            member = store.info(1).members[key]
            try:
                value = store.load(1, keys=[key])[key]
            except CorruptSnapshotError:
                assert member.offset + member.stored_size > cut, f"member {key} was intact at cut {cut}"
                continue
            assert member.offset + member.stored_size <= cut
            assert value == state[key] if not isinstance(value, torch.Tensor) else torch.equal(value, state[key])


def test_every_altered_byte_of_member_data_is_detected(store: SnapshotStore) -> None:
    saved(store)
    data = archive_bytes(store)
    member = store.info(1).members["policy"]
    for pos in range(member.offset, member.offset + member.stored_size):
        altered = bytearray(data)
        altered[pos] ^= 0x40
        replace_archive(store, 1, bytes(altered))
        expect_typed(lambda: store.load(1, keys=["policy"]))
        expect_typed(lambda: store.verify(1))


# -- central directory and member names, through read_directory and repair --------------------------------


def zip_with(names: list[str], *, patch: Callable[[bytes], bytes] = lambda b: b) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in names:
            zf.writestr(name, b"data")
    return patch(buf.getvalue())


def sub(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    assert len(old) == len(new)
    return lambda b: b.replace(old, new)


def _eocd_patch(field: str, value: int) -> Callable[[bytes], bytes]:
    def patch(b: bytes) -> bytes:
        at = b.rfind(b"PK\x05\x06")
        fields = list(struct.unpack_from("<4s4H2LH", b, at))
        index = {"count": 4, "cd_size": 5, "cd_offset": 6}[field]
        fields[index] = value
        return b[:at] + struct.pack("<4s4H2LH", *fields) + b[at + 22 :]

    return patch


HOSTILE_ZIPS: dict[str, bytes] = {
    "dotdot": zip_with(["../evil.zst"]),
    "dotdot_nested": zip_with(["a/../../evil.zst"]),
    "backslash_dotdot": zip_with(["..\\evil.zst"]),
    "absolute": zip_with(["/etc/evil.zst"]),
    "drive": zip_with(["C:/evil.zst"]),
    "nul": zip_with(["evilXname.zst"], patch=sub(b"evilXname", b"evil\x00name")),
    "not_utf8": zip_with(["evilXname.zst"], patch=sub(b"evilXname", b"evil\xffname")),
    "duplicate": zip_with(["a.zst", "b.zst"], patch=sub(b"b.zst", b"a.zst")),
    "wrong_eocd_magic": zip_with(["a.zst"], patch=sub(b"PK\x05\x06", b"PK\x05\x07")),
    "wrong_cd_magic": zip_with(["a.zst"], patch=sub(b"PK\x01\x02", b"PK\x01\x03")),
    "cd_offset_past_end": zip_with(["a.zst"], patch=_eocd_patch("cd_offset", 10**6)),
    "cd_offset_inside_data": zip_with(["a.zst"], patch=_eocd_patch("cd_offset", 5)),
    "cd_size_huge": zip_with(["a.zst"], patch=_eocd_patch("cd_size", 2**32 - 1)),
    "count_too_high": zip_with(["a.zst"], patch=_eocd_patch("count", 60000)),
    "empty_file": b"",
    "not_a_zip": b"hello, this is not a zip archive" * 10,
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ZIPS))
def test_hostile_central_directories_are_refused(case: str, store: SnapshotStore) -> None:
    data = HOSTILE_ZIPS[case]
    with pytest.raises(CorruptSnapshotError):
        read_directory(lambda s, e: data[s:e], len(data), where=case)
    # repair() meets it as an unlisted archive: skipped with a warning, never recovered, never fatal.
    saved(store)
    store.storage.fs.pipe_file(store.storage.path("snapshots/000000000002-0123456789abcdef.zip"), data)
    write_generation(store, None, raw=b"{torn")  # repair reads unlisted archives only over a corrupt generation
    assert store.repair().itrs() == [1]


def test_hostile_names_never_write_outside_the_run(tmp_path: Path) -> None:
    run = tmp_path / "inner" / "run"
    store = SnapshotStore(str(run))
    store.save(1, {"x": 1})
    for i, data in enumerate(HOSTILE_ZIPS.values()):
        (run / "snapshots" / f"{100 + i:012d}-0123456789abcdef.zip").write_bytes(data)
    before = sorted(p for p in tmp_path.rglob("*") if run not in p.parents and p != run)
    write_generation(store, None, raw=b"{torn")  # repair reads unlisted archives only over a corrupt generation
    store.repair()
    store.verify(1)
    store.gc(min_age=0)
    after = sorted(p for p in tmp_path.rglob("*") if run not in p.parents and p != run)
    assert before == after
    assert store.itrs() == [1]


def test_repair_skips_archives_with_hostile_meta(store: SnapshotStore) -> None:
    saved(store)
    for i, meta in enumerate([b"not json", b"[1, 2]", b"[" * 100_000, b'{"itr": 5}', b'{"itr": -1, "members": {}}']):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("meta.json", meta)
        store.storage.fs.pipe_file(store.storage.path(f"snapshots/{50 + i:012d}-0123456789abcdef.zip"), buf.getvalue())
    write_generation(store, None, raw=b"{torn")  # repair reads unlisted archives only over a corrupt generation
    assert store.repair().itrs() == [1]


def test_repair_skips_an_archive_whose_meta_json_was_altered(store: SnapshotStore) -> None:
    """A flipped byte in a metric passes json.loads and verify(): only the zip CRC-32 of meta.json catches it."""
    saved(store)
    info = store.save(2, {"w": torch.ones(3)}, metrics={"return": 123.0})
    path = store.storage.path(info.path)
    data = bytearray(store.storage.fs.cat_file(path))
    at = data.index(b"123.0", data.index(b'"metrics"'))
    data[at] = ord("9")  # "923.0": still valid JSON, wrong metric
    store._log.commit(lambda current: [s for s in current.snapshots if s.itr != 2])  # its commit lost
    write_generation(store, None, raw=b"{torn")  # in a generation that does not read: repair rebuilds
    store.storage.fs.pipe_file(path, bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert store.repair().itrs() == [1]
    data[at] = ord("1")  # the archive as written is recovered
    store.storage.fs.pipe_file(path, bytes(data))
    write_generation(store, None, raw=b"{torn")
    repaired = store.repair()
    assert repaired.itrs() == [1, 2]
    assert store.info(2).metrics == {"return": 123.0}


# -- value payloads: bad magic, bad headers, sizes that lie, bombs ----------------------------------------

BAD_PAYLOADS: dict[str, bytes] = {
    "empty": b"",
    "wrong_magic": b"NOTMAGIC" + struct.pack("<Q", 2) + b"{}",
    "header_len_huge": MAGIC + struct.pack("<Q", 2**62),
    "header_len_past_end": MAGIC + struct.pack("<Q", 1000) + b"{}",
    "header_not_json": payload(None, raw_header=b"{not json"),
    "header_not_utf8": payload(None, raw_header=b'{"tree": "\xff"}'),
    "header_deeply_nested": payload(None, raw_header=b'{"tree": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "header_not_object": payload([1, 2]),
    "no_tree": payload({"data_size": 0}),
    "unknown_node": payload({"tree": {"$evil": 1}}),
    "node_three_keys": payload({"tree": {"a": 1, "b": 2, "c": 3}}),
    "unhashable_key": payload({"tree": {"$dict": [[[1, 2], 3]]}}),
    "bad_float": payload({"tree": {"$float": "not-a-float"}}),
    "tensor_unknown_dtype": payload({"tree": {"$tensor": {"dtype": "evil", "shape": [1], "nbytes": 4}}}),
    "tensor_dtype_not_dtype": payload({"tree": {"$tensor": {"dtype": "Tensor", "shape": [1], "nbytes": 4}}}),
    "tensor_negative_shape": payload({"tree": {"$tensor": {"dtype": "float32", "shape": [-4], "nbytes": 4}}}),
    "tensor_size_lies": payload({"tree": {"$tensor": {"dtype": "float32", "shape": [4], "nbytes": 4}}}, b"\0" * 4),
    "tensor_huge_shape": payload({"tree": {"$tensor": {"dtype": "float32", "shape": [2**40], "nbytes": 2**42}}}),
    "tensor_overflow_shape": payload({"tree": {"$tensor": {"dtype": "float64", "shape": [2**62, 2**62], "nbytes": 8}}}),
    "tensor_data_short": payload({"tree": {"$tensor": {"dtype": "float32", "shape": [4], "nbytes": 16}}}, b"\0" * 8),
    "ndarray_object": payload({"tree": {"$ndarray": {"dtype": "|O", "shape": [1], "nbytes": 8, "scalar": False}}}),
    "ndarray_bad_descr": payload({"tree": {"$ndarray": {"dtype": "<zz", "shape": [1], "nbytes": 8, "scalar": False}}}),
    "ndarray_huge": payload(
        {"tree": {"$ndarray": {"dtype": "<f8", "shape": [2**40], "nbytes": 2**43, "scalar": False}}}
    ),
    "bytes_huge": payload({"tree": {"$bytes": 2**50}}),
    "bytes_negative": payload({"tree": {"$bytes": -5}}),
    "bytes_past_end": payload({"tree": {"$bytes": 100}}, b"short"),
    "trailing_garbage": payload({"tree": 5}, b"garbage"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAYLOADS))
def test_malformed_payloads_are_refused(case: str, store: SnapshotStore) -> None:
    commit_raw(store, 1, {"x": BAD_PAYLOADS[case]})
    expect_typed(lambda: store.load(1))
    assert store.storage.bytes_read < 2**20  # refused before reading (or allocating) anything big


def test_pickle_huge_is_refused_even_with_allow_pickle(store: SnapshotStore) -> None:
    commit_raw(store, 1, {"x": payload({"tree": {"$pickle": {"type": "x", "nbytes": 2**50}}})})
    with pytest.raises(UnsafeLoadError):
        store.load(1)
    expect_typed(lambda: store.load(1, allow_pickle=True))


def test_zip_bomb_is_refused_against_the_configured_limit(store: SnapshotStore, monkeypatch: Any) -> None:
    bomb = payload({"tree": {"$bytes": 64 * 2**20}}, bytes(64 * 2**20))
    commit_raw(store, 1, {"bomb": bomb, "ok": payload({"tree": 1})})
    member = store.info(1).members["bomb"]
    assert member.stored_size < 2**20 < member.raw_size  # small stored, huge decompressed
    monkeypatch.setattr(values_mod, "MAX_MEMBER_SIZE", 16 * 2**20)
    store.storage.bytes_read = 0
    expect_typed(lambda: store.load(1, keys=["bomb"]), match="MAX_MEMBER_SIZE")
    expect_typed(lambda: store.verify(1), match="MAX_MEMBER_SIZE")
    assert store.storage.bytes_read < 2**16, "refused before downloading the member"
    assert store.load(1, keys=["ok"]) == {"ok": 1}
    monkeypatch.setattr(values_mod, "MAX_MEMBER_SIZE", 2**30)
    assert len(store.load(1, keys=["bomb"])["bomb"]) == 64 * 2**20


def test_declared_sizes_that_lie_are_refused(store: SnapshotStore) -> None:
    commit_raw(store, 1, {"x": payload({"tree": {"$bytes": 2**20}}, bytes(2**20))})
    doc = newest_doc(store)
    for field, value, match in [
        ("raw_size", 100, "declared size"),  # decompresses to more than declared: a bomb that lies
        ("raw_size", 2**50, "MAX_MEMBER_SIZE"),  # declares more than any loader should allocate
        ("raw_size", 2**21, "size differs"),
        ("stored_size", 10, "corrupt|checksum|truncated"),
        ("stored_size", 2**40, "truncated|corrupt"),
        ("offset", 2**40, "truncated|corrupt"),
        ("crc32", "00000000", "checksum"),
    ]:
        entry = json.loads(json.dumps(doc))
        entry["snapshots"][0]["members"]["x"][field] = value
        write_generation(store, {**entry, "generation": store._log.generations()[-1] + 1})
        expect_typed(lambda: store.load(1), match=match)


def test_a_real_zstd_bomb_stops_at_the_declared_size(store: SnapshotStore) -> None:
    commit_raw(store, 1, {"x": payload({"tree": {"$bytes": 16}}, bytes(16))})
    info = store.info(1)
    bomb = zstandard.ZstdCompressor(write_checksum=True).compress(payload({"tree": {"$bytes": 16}}, bytes(64 * 2**20)))
    data = bytearray(archive_bytes(store))
    member = info.members["x"]
    patched = bytes(data[: member.offset]) + bomb + bytes(data[member.offset + member.stored_size :])
    replace_archive(store, 1, patched)
    doc = newest_doc(store)
    member_doc = doc["snapshots"][0]["members"]["x"]
    member_doc.update(stored_size=len(bomb), crc32=f"{zlib.crc32(bomb):08x}")
    doc["snapshots"][0]["size"] = len(patched)
    write_generation(store, {**doc, "generation": doc["generation"] + 1})
    # as a seekable member it has no frame index: refused before a byte is decompressed
    expect_typed(lambda: store.load(1), match="no frame index")
    member_doc["codec"] = "zstd"  # as a single-frame member (older archives), streamed: stopped at the size
    write_generation(store, {**doc, "generation": doc["generation"] + 2})
    expect_typed(lambda: store.load(1), match="declared size")


# -- manifests ------------------------------------------------------------------------------------------------


def _entry_patch(**changes: Any) -> Callable[[dict[str, Any]], Any]:
    def patch(doc: dict[str, Any]) -> Any:
        doc["snapshots"][0].update(changes)
        return doc

    return patch


MANIFEST_CASES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "not_a_dict": lambda d: [d],
    "wrong_format": lambda d: {**d, "format": "other"},
    "generation_mismatch": lambda d: {**d, "generation": 999},
    "snapshots_not_list": lambda d: {**d, "snapshots": {"a": 1}},
    "entry_not_dict": lambda d: {**d, "snapshots": ["x"]},
    "duplicate_itr": lambda d: {**d, "snapshots": d["snapshots"] * 2},
    "path_dotdot": _entry_patch(path="../../outside.zip"),
    "path_absolute": _entry_patch(path="/etc/passwd"),
    "path_nul": _entry_patch(path="snapshots/a\x00b.zip"),
    "path_other_url": _entry_patch(path="s3://elsewhere/x.zip"),
    "size_negative": _entry_patch(size=-1),
    "size_string": _entry_patch(size="12"),
    "itr_bool": _entry_patch(itr=True),
    "created_garbage": _entry_patch(created="yesterday"),
    "members_not_dict": _entry_patch(members=[1]),
    "member_offset_string": lambda d: _member_patch(d, offset="0"),
    "member_path_dotdot": lambda d: _member_patch(d, path="../x.zip"),
    "metric_nan": _entry_patch(metrics={"r": float("nan")}),
}


def _member_patch(doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    next(iter(doc["snapshots"][0]["members"].values())).update(changes)
    return doc


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_malformed_manifests_are_refused(case: str, store: SnapshotStore) -> None:
    saved(store)
    doc = MANIFEST_CASES[case](newest_doc(store))
    if isinstance(doc, dict) and case != "generation_mismatch":
        doc["generation"] = store._log.generations()[-1] + 1
    write_generation(store, doc)
    expect_typed(lambda: store.load())
    assert store.repair().itrs() == [1]  # the previous generation and the archive are intact
    store.verify(1)


@pytest.mark.parametrize(
    "raw", [b"", b"\xff\xfe", b"{", b"[" * 100_000, b"null", b'{"format": "bucketsnap-manifest"}'], ids=repr
)
def test_unparseable_manifests_are_refused(raw: bytes, store: SnapshotStore) -> None:
    saved(store)
    write_generation(store, None, raw=raw)
    expect_typed(lambda: store.itrs())
    assert store.repair().itrs() == [1]


def test_unknown_manifest_version_names_it(store: SnapshotStore) -> None:
    saved(store)
    doc = newest_doc(store)
    write_generation(store, {**doc, "version": 7, "generation": doc["generation"] + 1})
    expect_typed(lambda: store.load(), match="version 7.*upgrade bucketsnap")


def test_unknown_archive_format_version_names_it(store: SnapshotStore) -> None:
    saved(store)
    doc = newest_doc(store)
    doc["snapshots"][0]["format_version"] = FORMAT_VERSION + 41
    write_generation(store, {**doc, "generation": doc["generation"] + 1})
    expect_typed(lambda: store.load(), match=f"format version {FORMAT_VERSION + 41}.*upgrade bucketsnap")
    expect_typed(lambda: store.verify(), match=f"format version {FORMAT_VERSION + 41}")


def test_repair_keeps_a_newer_format_archive_but_loading_names_the_version(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bucketsnap import _archive as archive

    monkeypatch.setattr(archive, "FORMAT_VERSION", 9)  # as a newer bucketsnap writes it
    buf = io.BytesIO()
    writer = ArchiveWriter(buf)
    writer.add("x", 1)
    writer.finish({"format": "bucketsnap", "itr": 3, "created": "2026-01-01T00:00:00+00:00", "metrics": {}})
    monkeypatch.undo()
    data = buf.getvalue()
    assert b'"format_version": 9' in data
    write_generation(store, None, raw=b"{torn")  # the generation that committed it does not read
    store.storage.fs.pipe_file(store.storage.path("snapshots/000000000003-0123456789abcdef.zip"), data)
    assert store.repair().itrs() == [3]  # a newer bucketsnap can read it: repair never drops data
    expect_typed(lambda: store.load(3), match="format version 9.*upgrade bucketsnap")


def test_manifest_referencing_missing_objects(store: SnapshotStore) -> None:
    saved(store)
    doc = newest_doc(store)
    store.storage.delete(doc["snapshots"][0]["path"])
    with pytest.raises(SnapshotNotFoundError, match="missing"):
        store.load()
    with pytest.raises(SnapshotNotFoundError):
        store.verify()
    saved_again = SnapshotStore(store.url)
    saved_again.save(2, {"x": 1})
    doc = newest_doc(saved_again)
    doc["snapshots"][-1]["refs"] = ["chunks/missing"]
    doc["snapshots"][-1]["members"]["x"]["path"] = "snapshots/missing.zip"
    write_generation(saved_again, {**doc, "generation": doc["generation"] + 1})
    with pytest.raises(SnapshotNotFoundError):
        saved_again.load(2)
    with pytest.raises(SnapshotNotFoundError):
        saved_again.verify(2)


def test_no_case_writes_outside_the_memory_run(store: SnapshotStore) -> None:
    outside = {k: v for k, v in MemoryFileSystem.store.items() if not k.startswith(store.storage.root)}
    saved(store)
    for case in sorted(MANIFEST_CASES):
        doc = MANIFEST_CASES[case](newest_doc(store))
        if isinstance(doc, dict) and case != "generation_mismatch":
            doc["generation"] = store._log.generations()[-1] + 1
        write_generation(store, doc)
        with pytest.raises(BucketsnapError):
            store.load()
        store.repair()
    after = {k: v for k, v in MemoryFileSystem.store.items() if not k.startswith(store.storage.root)}
    assert after == outside
    inside = [k.removeprefix(store.storage.root + "/") for k in MemoryFileSystem.store if k not in outside]
    assert all(k.startswith((f"{MANIFEST_DIR}/", "snapshots/")) for k in inside), inside


def test_the_member_size_limit_is_a_store_option(store: SnapshotStore) -> None:
    bomb = payload({"tree": {"$bytes": 64 * 2**20}}, bytes(64 * 2**20))
    commit_raw(store, 1, {"bomb": bomb, "ok": payload({"tree": 1})})
    strict = SnapshotStore(store.storage.url, max_member_size=16 * 2**20)
    strict.storage.bytes_read = 0
    expect_typed(lambda: strict.load(1, keys=["bomb"]), match="max_member_size")
    expect_typed(lambda: strict.verify(1), match="max_member_size")
    assert strict.storage.bytes_read < 2**16, "refused before downloading the member"
    assert strict.load(1, keys=["ok"]) == {"ok": 1}
    assert len(SnapshotStore(store.storage.url, max_member_size=2**30).load(1, keys=["bomb"])["bomb"]) == 64 * 2**20
