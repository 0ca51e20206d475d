"""Hostile bodies in microseconds: nesting, echoed values. (The real server's answers: tests/service/.)"""

from __future__ import annotations

import functools
import json

import pytest

from embedserve.errors import InvalidRequest, clip, quoted
from embedserve.protocol import MAX_NESTING, check_nesting, decode_request, decode_rerank


def nested(depth: int, inner: str = "1") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


def test_nesting_up_to_the_limit_passes_and_one_more_is_refused():
    check_nesting(b'{"input":' + nested(MAX_NESTING - 1) + b"}")
    with pytest.raises(InvalidRequest, match=f"more than {MAX_NESTING} levels deep"):
        check_nesting(b'{"input":' + nested(MAX_NESTING) + b"}")


def test_brackets_inside_strings_do_not_count():
    text = "[{" * 5000 + '\\"[[' + "]}" * 10
    body = json.dumps({"input": [text, text], "model": "m"}).encode()
    check_nesting(body)
    assert decode_request(body).input == [text, text]


@pytest.mark.parametrize("decode", [decode_request, functools.partial(decode_rerank, max_items=10)])
def test_a_body_nested_5000_deep_is_a_400_not_a_recursion_error(decode):
    for field in ("input", "query", "unknown"):
        body = b'{"model":"m","' + field.encode() + b'":' + nested(5000) + b"}"
        with pytest.raises(InvalidRequest, match="levels deep"):
            decode(body)


def test_error_messages_quote_a_value_only_so_far():
    assert quoted("query") == "'query'"
    long = "x" * 1_000_000
    assert len(quoted(long)) < 100 and "(1000000 characters)" in quoted(long)
    assert len(clip(long)) < 250
    with pytest.raises(InvalidRequest) as e:
        decode_request(json.dumps({"input": "a", "model": "m", "encoding_format": long}).encode())
    assert len(e.value.message) < 200


def test_one_list_of_token_ids_is_one_input_whatever_its_length():
    from embedserve.protocol import parse_input

    assert parse_input(list(range(3000)), max_items=2048) == [list(range(3000))]
    with pytest.raises(InvalidRequest, match="input has 3000 items; this server accepts at most 2048"):
        parse_input([[1]] * 3000, max_items=2048)
    with pytest.raises(InvalidRequest, match="input has 3000 items"):
        parse_input(["a"] * 3000, max_items=2048)
