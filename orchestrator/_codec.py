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


def encode_value(value: Any, what: str, name: str | None = None) -> bytes:
    """Encode ``value``; raise ``TypeError`` that names ``what`` (followed by ``name``, quoted,
    when given: the text is only built for the error) and the offending type."""
    try:
        return _encoder.encode(value)
    except (TypeError, msgspec.EncodeError, OverflowError) as exc:
        if name is not None:
            what = f"{what} {name!r}"
        raise TypeError(
            f"{what} cannot be encoded ({type(value).__name__}): {exc}; values that cross a step "
            "boundary must be msgspec-encodable (JSON types, Structs, dataclasses, datetimes...)"
        ) from None
