"""The NATS transport's header parser gives the headers nats-py's own gives, and its publish
command is the bytes nats-py's own publish writes."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from transport._nats import _Client, pub_command

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


_TEXT = st.sampled_from(
    ["Nats-Msg-Id", "Content-Type", "tx-1:s:invoke:1", "a b", " x", "y ", "", "\r", "\n", "é", ":"]
)
_HEADERS = st.none() | st.dictionaries(
    st.lists(_TEXT, min_size=1, max_size=3).map("".join),
    st.lists(_TEXT, max_size=3).map("".join),
    max_size=3,
)


def _nats_py_command(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> bytes:
    """What nats-py's own publish queues for these arguments (raises for refused headers)."""
    client = Client()
    client._pending = []

    async def publish() -> None:
        await client._send_publish(subject, reply, payload, len(payload), headers)

    asyncio.run(publish())
    (command,) = client._pending
    return command


@given(
    st.sampled_from(["orch.step.a", "$KV.orch_tx.t-1", "_INBOX.x.1"]),
    st.sampled_from(["", "_INBOX.abc.7"]),
    st.binary(max_size=20),
    _HEADERS,
)
def test_publish_commands_are_the_bytes_nats_py_writes(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> None:
    ours = pub_command(subject, reply, payload, headers)
    try:
        theirs: bytes | None = _nats_py_command(subject, reply, payload, headers)
    except Exception:  # refused by nats-py: ours leaves it to nats-py too
        theirs = None
    if ours is None:  # left to nats-py (which may accept it, rewritten)
        return
    assert ours == theirs


def test_typical_commands() -> None:
    headers = {"Nats-Msg-Id": "tx-1:step:invoke:1"}
    expected = _nats_py_command("orch.step.a", "_INBOX.x.1", b"data", headers)
    assert pub_command("orch.step.a", "_INBOX.x.1", b"data", headers) == expected
    assert pub_command("orch.evt.a.b", "", b"{}", None) == b"PUB orch.evt.a.b  2\r\n{}\r\n"
    assert pub_command("s", "", b"", {"Bad Name": "v"}) is None
