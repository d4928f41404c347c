"""Rows to messages: the fast JSON -> Value conversion is json_format.ParseDict's, byte for
byte, on any JSON a step can put out."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.server.store.snapshots import to_value

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def parse_dict(obj: Any) -> bytes:
    return json_format.ParseDict(obj, struct_pb2.Value()).SerializeToString(deterministic=True)


@given(JSON)
def test_to_value_is_parse_dict(obj: Any) -> None:
    assert to_value(obj).SerializeToString(deterministic=True) == parse_dict(obj)


@pytest.mark.parametrize("obj", [{}, [], {"a": {}, "b": []}, None, 0, -0.0, False, ""])
def test_empty_and_zero_values_are_set(obj: Any) -> None:
    value = to_value(obj)
    assert value.WhichOneof("kind") is not None
    assert value.SerializeToString(deterministic=True) == parse_dict(obj)


def test_what_is_not_json_is_refused_as_before() -> None:
    with pytest.raises(json_format.ParseError):
        to_value(object())
