"""The one codec for values that cross a step boundary (msgpack, via msgspec)."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["EMPTY_MAP", "NONE", "decode", "encode", "encode_value"]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()

encode = _encoder.encode
decode = _decoder.decode
NONE = encode(None)
EMPTY_MAP = encode({})
"""An empty run context, encoded."""


def encode_value(value: Any, what: str) -> bytes:
    """Encode ``value``; raise ``TypeError`` that names ``what`` and the offending type."""
    try:
        return _encoder.encode(value)
    except (TypeError, msgspec.EncodeError, OverflowError) as exc:
        raise TypeError(
            f"{what} cannot be encoded ({type(value).__name__}): {exc}; values that cross a step "
            "boundary must be msgspec-encodable (JSON types, Structs, dataclasses, datetimes...)"
        ) from None
