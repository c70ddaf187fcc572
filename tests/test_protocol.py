"""Pure protocol rules: which encoding a request uses, what decodes, what a reply says."""

from __future__ import annotations

import json

import msgpack
import pytest

from faas import BadRequest, DeadlineExceeded, FaasError, HandlerError, Overloaded
from faas.protocol import (
    Encoding,
    Metrics,
    decode_event,
    error_reply,
    invoke_subject,
    ok_reply,
    parse_reply,
    request_encoding,
)


@pytest.mark.parametrize(("body", "headers", "expected"), [
    (b'{"a": 1}', None, Encoding.JSON),
    (b"  {}", None, Encoding.JSON),
    (msgpack.packb({"a": 1}), None, Encoding.MSGPACK),
    (msgpack.packb({str(i): i for i in range(20)}), None, Encoding.MSGPACK),  # map16
    (b"", None, Encoding.MSGPACK),
    (b"", {"Content-Type": "application/json; charset=utf-8"}, Encoding.JSON),
    (b"\xff\xfe", None, Encoding.MSGPACK),
])
def test_request_encoding(body, headers, expected):
    assert request_encoding(body, headers) is expected


def test_decode_event_rejects_non_objects():
    assert decode_event(b"", Encoding.MSGPACK) == {}
    for body, enc in [(b"[1]", Encoding.JSON), (b"{", Encoding.JSON),
                      (msgpack.packb("s"), Encoding.MSGPACK)]:
        with pytest.raises(BadRequest):
            decode_event(body, enc)


def test_round_trip_ok_reply():
    body, headers = ok_reply({"x": 1}, Metrics(request_id="r", node="n", ttft_ms=1.5), Encoding.JSON)
    assert headers["Content-Type"] == "application/json"
    result = parse_reply(body, headers)
    assert result.output == {"x": 1} and result.metrics["ttft_ms"] == 1.5


@pytest.mark.parametrize("err", [BadRequest("b"), HandlerError("h\nmultiline"),
                                 Overloaded("o"), DeadlineExceeded("d")])
@pytest.mark.parametrize("encoding", list(Encoding))
def test_error_reply_round_trips_to_the_same_class(err, encoding):
    body, headers = error_reply(err, encoding, "rid")
    assert headers["Nats-Service-Error-Code"] == str(err.code)
    assert "\n" not in headers["Nats-Service-Error"]
    with pytest.raises(type(err)) as info:
        parse_reply(body, headers)
    assert info.value.message == err.message


def test_unknown_code_is_still_a_faas_error():
    body = json.dumps({"error": {"code": 418, "message": "teapot"}}).encode()
    with pytest.raises(FaasError) as info:
        parse_reply(body, {"Content-Type": "application/json", "Nats-Service-Error-Code": "418"})
    assert info.value.code == 418


def test_subjects():
    assert invoke_subject("support") == "faas.invoke.support"
