"""The value codec table (bucketsnap._values): the format it writes is pinned, and a new codec is one entry."""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch

from bucketsnap import CorruptSnapshotError, SnapshotStore
from bucketsnap import _values as values_mod
from bucketsnap._values import Codec, Decoder, Encoder, decode, encode, register_codec


@pytest.fixture
def codec_table(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever a test registers is gone after it."""
    monkeypatch.setattr(values_mod, "_CODECS", dict(values_mod._CODECS))
    monkeypatch.setattr(values_mod, "_BY_TYPE", dict(values_mod._BY_TYPE))
    yield


def _raw(value: Any) -> tuple[bytes, bytes]:
    encoded = encode(value)
    return encoded.header, b"".join(bytes(memoryview(c).cast("B")) for c in encoded.chunks())


def test_every_built_in_kind_is_written_byte_for_byte_as_the_format_says() -> None:
    # Pinned from the encoder before the codec table: archives written since decode anywhere, and back.
    metadata_dict: OrderedDict[str, Any] = OrderedDict(w=torch.arange(6, dtype=torch.float32).reshape(2, 3))
    metadata_dict._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    value = {
        "sd": metadata_dict,
        "p": torch.nn.Parameter(torch.ones(2, dtype=torch.float16), requires_grad=False),
        "a": np.arange(4, dtype=">i4").reshape(2, 2),
        "s": np.float64(2.5),
        "t": (1, None, True, "x", 1.5, float("nan"), float("-inf")),
        "b": b"\x00\xff",
        3: [[]],
    }
    header, raw = _raw(value)
    assert header.decode() == (
        '{"tree":{"$dict":[["sd",{"$odict":[["w",{"$tensor":{"dtype":"float32","shape":[2,3],"device":"cpu",'
        '"nbytes":24}}]],"metadata":{"$dict":[["",{"$dict":[["version",1]]}]]}}],["p",{"$tensor":{"dtype":'
        '"float16","shape":[2],"device":"cpu","param":true,"requires_grad":false,"nbytes":4}}],["a",{"$ndarray":'
        '{"dtype":">i4","shape":[2,2],"scalar":false,"nbytes":16}}],["s",{"$ndarray":{"dtype":"<f8","shape":[],'
        '"scalar":true,"nbytes":8}}],["t",{"$tuple":[1,null,true,"x",1.5,{"$float":"nan"},{"$float":"-inf"}]}],'
        '["b",{"$bytes":2}],[3,[[]]]]},"data_size":54}'
    )
    assert hashlib.sha256(raw).hexdigest() == "90f51faa8fd776eae1b02d3f3bf59d4bdd46aa37e75b6ff0740d28a6bc957fe4"
    back = decode(io.BytesIO(raw))
    assert back["sd"]._metadata == {"": {"version": 1}} and torch.equal(back["sd"]["w"], metadata_dict["w"])
    assert isinstance(back["p"], torch.nn.Parameter) and not back["p"].requires_grad
    assert back["a"].dtype == np.dtype(">i4") and back["s"] == 2.5 and type(back["s"]) is np.float64
    assert back["t"][:5] == (1, None, True, "x", 1.5) and back["b"] == b"\x00\xff" and back[3] == [[]]


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_subclasses_go_where_they_went_before_the_table() -> None:
    class Sub(dict[str, int]):
        pass

    assert encode(np.float32(1)).header.startswith(b'{"tree":{"$ndarray"')  # a float subclass, numpy's
    assert b"$pickle" in encode(Sub(a=1)).header  # a dict subclass may carry state a $dict would lose
    assert b"$pickle" in encode(np.matrix([[1]])).header
    assert b"$pickle" in encode(torch.ones(1, device="meta")).header  # the tensor codec declines: pickled


def _encode_fraction(enc: Encoder, v: Fraction) -> Any:
    return {"$fraction": [enc.node(v.numerator), enc.node(v.denominator)]}


def _decode_fraction(dec: Decoder, node: dict[str, Any]) -> Any:
    numerator, denominator = (dec.node(x) for x in node["$fraction"])
    return Fraction(numerator, denominator)


class Celsius(float):
    """A float subclass: reaches its codec through ``accepts``, not by exact type."""


def _encode_celsius(enc: Encoder, v: Celsius) -> Any:
    return {"$celsius": {"bits": enc.add(memoryview(np.float64(v).tobytes()))}}


def _decode_celsius(dec: Decoder, node: dict[str, Any]) -> Any:
    return Celsius(np.frombuffer(dec.read(int(node["$celsius"]["bits"])), dtype=np.float64)[0])


def test_a_registered_codec_round_trips_through_a_store_without_pickle(codec_table: None) -> None:
    store = SnapshotStore("memory://codecs/run")
    state = {"ratio": [Fraction(1, 3), {"t": Celsius(21.5)}], "w": torch.ones(3)}
    before = store.save(1, state)
    assert before.members["ratio"].pickled  # without a codec, both are cloudpickled

    register_codec(Codec("$fraction", _encode_fraction, _decode_fraction, types=(Fraction,)))
    register_codec(Codec("$celsius", _encode_celsius, _decode_celsius, accepts=lambda t: issubclass(t, Celsius)))
    info = store.save(2, state)
    assert not info.members["ratio"].pickled
    loaded = store.load(2)  # allow_pickle is False: nothing was pickled
    assert loaded["ratio"] == [Fraction(1, 3), {"t": 21.5}] and type(loaded["ratio"][1]["t"]) is Celsius
    assert torch.equal(loaded["w"], state["w"])
    assert encode(1.5).header == b'{"tree":1.5,"data_size":0}'  # other kinds are untouched


def test_an_unregistered_tag_is_a_corrupt_snapshot(codec_table: None) -> None:
    register_codec(Codec("$fraction", _encode_fraction, _decode_fraction, types=(Fraction,)))
    _, raw = _raw(Fraction(2, 5))
    del values_mod._CODECS["$fraction"]  # a reader without the codec
    with pytest.raises(CorruptSnapshotError, match=r"unknown node type \['\$fraction'\]"):
        decode(io.BytesIO(raw), where="w")


def test_a_tag_or_type_is_registered_once(codec_table: None) -> None:
    with pytest.raises(ValueError, match=r"\$tensor"):
        register_codec(Codec("$tensor", _encode_fraction, _decode_fraction))
    with pytest.raises(ValueError, match="tuple"):
        register_codec(Codec("$pair", _encode_fraction, _decode_fraction, types=(tuple,)))
