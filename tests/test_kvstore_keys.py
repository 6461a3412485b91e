"""Transaction ids as bucket keys: any id makes a valid key, and the key gives the id back
(a takeover reads only its partition's transactions, by their keys)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from actors._kvstore import kv_key, transaction_id_of

_KEY = re.compile(r"[A-Za-z0-9_\-=]+")


@given(st.text(min_size=1))
def test_a_key_is_valid_and_gives_its_transaction_id_back(transaction_id: str) -> None:
    key = kv_key(transaction_id)
    assert _KEY.fullmatch(key), key
    assert transaction_id_of(key) == transaction_id


def test_plain_ids_are_their_own_keys() -> None:
    assert kv_key("checkout-1a2b") == "checkout-1a2b"
    assert kv_key("order:42/x") == "order=3A42=2Fx"
