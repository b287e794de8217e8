"""A bounded fuzz target for the archive reader: mutated archives give a typed error or the right value.

Two drivers over the same target: hypothesis (shrinks a failure to a minimal mutation) and a seeded random
loop that runs for ``BUCKETSNAP_FUZZ_SECONDS`` (3 s in CI; set it higher to fuzz for longer).
"""

from __future__ import annotations

import io
import os
import random
import time
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bucketsnap import BucketsnapError
from bucketsnap._archive import ArchiveWriter, load_member, verify_member
from bucketsnap._info import MemberInfo
from bucketsnap._zipformat import data_offset, read_directory

FUZZ_SECONDS = float(os.environ.get("BUCKETSNAP_FUZZ_SECONDS", "3"))
STATE: dict[str, Any] = {"policy": torch.arange(40, dtype=torch.float32), "step": 3, "meta": {"k": (1, "v")}}


def _archive() -> tuple[bytes, dict[str, MemberInfo]]:
    buf = io.BytesIO()
    writer = ArchiveWriter(buf)
    for key, value in STATE.items():
        writer.add(key, value)
    writer.finish({"format": "bucketsnap", "itr": 1, "created": "2026-01-01T00:00:00+00:00", "metrics": {}})
    return buf.getvalue(), dict(writer.members)


ARCHIVE, MEMBERS = _archive()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def target(data: bytes) -> None:
    """The fuzz target: every way bucketsnap reads an archive, on ``data``.

    A damaged archive may be refused (a ``BucketsnapError``) or read as the right value; the intact one must be
    read, whole and exact: a reader that refuses everything does not pass.
    """
    if data == ARCHIVE:  # a mutation that changed nothing, a cut at the end, or the intact archive itself
        check_intact(data)
        return
    read = lambda start, end: data[start:end]  # noqa: E731
    try:
        entries = read_directory(read, len(data), where="fuzz")
        for entry in entries.values():
            data_offset(read, entry, len(data), where="fuzz")
    except BucketsnapError:
        pass
    for key, member in MEMBERS.items():  # the manifest's offsets, against the mutated bytes
        try:
            value = load_member(read, member, where="fuzz")
        except BucketsnapError:
            continue
        assert _same(value, STATE[key]), f"{key}: a damaged archive loaded as a different value"
        verify_member(read, member, where="fuzz")


def check_intact(data: bytes) -> None:
    """Every reader accepts ``data`` and finds each member where the writer put it, with its exact value."""
    read = lambda start, end: data[start:end]  # noqa: E731
    entries = read_directory(read, len(data), where="intact")
    assert {m.name for m in MEMBERS.values()} <= set(entries)
    for member in MEMBERS.values():
        entry = entries[member.name]
        assert data_offset(read, entry, len(data), where="intact") == member.offset
        assert (entry.stored_size, f"{entry.crc32:08x}") == (member.stored_size, member.crc32)
    for key, member in MEMBERS.items():
        assert _same(load_member(read, member, where="intact"), STATE[key]), key
        verify_member(read, member, where="intact")


def test_the_target_accepts_the_intact_archive() -> None:
    target(ARCHIVE)
    target(bytes(bytearray(ARCHIVE)))  # equal bytes, another object: still held to the intact rule


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        at = rng.randrange(len(out) + 1) if out else 0
        if kind == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif kind == 2:
            del out[at : at + rng.randint(1, 64)]
        elif kind == 3:
            out = out[:at]
        elif out:  # overwrite with an "interesting" value: offsets and sizes are 2, 4 or 8 bytes
            value = rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFF, len(data), len(data) + 1])
            width = rng.choice([2, 4, 8])
            out[at : at + width] = value.to_bytes(8, "little")[:width]
    return bytes(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(ARCHIVE) - 1), st.integers(0, 255), st.integers(0, len(ARCHIVE)))
def test_fuzz_one_byte_and_truncation(at: int, value: int, cut: int) -> None:
    data = bytearray(ARCHIVE)
    data[at] = value
    target(bytes(data))
    target(ARCHIVE[:cut])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    target(data)
    target(ARCHIVE[:-22] + data[-22:])  # a hostile end-of-central-directory record


@pytest.mark.timeout(60)
def test_fuzz_random_mutations_for_a_bounded_time() -> None:
    rng = random.Random(int(os.environ.get("BUCKETSNAP_FUZZ_SEED", "0")))
    deadline = time.monotonic() + FUZZ_SECONDS
    runs = 0
    while time.monotonic() < deadline:
        target(mutate(ARCHIVE, rng))
        runs += 1
    assert runs > 10
    target(ARCHIVE)  # and the target does accept the intact archive, whole and exact
