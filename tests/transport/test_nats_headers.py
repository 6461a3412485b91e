"""The NATS transport's header parser gives the headers nats-py's own gives."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from transport._nats import _Client

_PIECES = st.sampled_from(
    [
        b"Nats-Msg-Id",
        b"Content-Type",
        b"Status",
        b"X y",
        b"\xc3\xa9",
        b"\x1c",
        b":",
        b" ",
        b"\t",
        b"\r\n",
        b"application/json",
        b"503",
        b"\xff",
        b"a",
        b"-",
        b"\xe2\x80\x83",
    ]
)


@given(st.lists(_PIECES, max_size=24).map(b"".join))
def test_headers_parse_as_nats_py_parses_them(raw: bytes) -> None:
    assert _Client._parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_typical_headers() -> None:
    raw = b"Nats-Msg-Id: tx-1:step:invoke:1\r\nContent-Type: application/json\r\n\r\n"
    expected = {"Nats-Msg-Id": "tx-1:step:invoke:1", "Content-Type": "application/json"}
    assert _Client._parse_header_lines(raw) == expected == Client._parse_header_lines(raw)
