"""The key-value store of the services: transaction ids as bucket keys (any id makes a valid
key, and the key gives the id back: a takeover reads only its partition's transactions, by their
keys), and what a crash between two writes leaves behind."""

from __future__ import annotations

import re

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors import KvStore
from actors._kvstore import kv_key, transaction_id_of
from orchestrator._transaction import TxState
from transport import MemoryTransport

_KEY = re.compile(r"[A-Za-z0-9_\-=]+")


@given(st.text(min_size=1))
def test_a_key_is_valid_and_gives_its_transaction_id_back(transaction_id: str) -> None:
    key = kv_key(transaction_id)
    assert _KEY.fullmatch(key), key
    assert transaction_id_of(key) == transaction_id


def test_plain_ids_are_their_own_keys() -> None:
    assert kv_key("checkout-1a2b") == "checkout-1a2b"
    assert kv_key("order:42/x") == "order=3A42=2Fx"


@pytest.mark.anyio
async def test_a_finish_cut_short_leaves_no_checkpoint_behind_once_loaded() -> None:
    async with MemoryTransport() as transport:
        store = KvStore(transport, prefix="cut")
        await store.open()
        live = TxState(workflow="w", transaction_id="t/1", status="invoking", version=3)
        await store.save(live)
        # The coordinator wrote the retained copy and died before deleting the checkpoint.
        final = msgspec.structs.replace(live, status="done", version=4)
        await store.done.create(kv_key("t/1"), msgspec.msgpack.encode(final), ttl=60)
        assert [s.transaction_id for s in await store.live()] == ["t/1"]

        loaded = await store.load("t/1")

        assert loaded is not None
        assert (loaded.status, loaded.version) == ("done", 4)
        assert await store.live() == []
        assert await store.read("t/1") == loaded


@pytest.mark.anyio
@pytest.mark.parametrize("retention", [60.0, 0.0])
async def test_a_finish_that_keeps_the_checkpoint_until_forget(retention: float) -> None:
    # A coordinator retires a transaction, lets its finish out, and only then drops the
    # checkpoint: in between, every read finds it finished (with nothing retained, there is
    # no newer copy to win, so the checkpoint goes at once).
    async with MemoryTransport() as transport:
        store = KvStore(transport, prefix="keep")
        await store.open()
        live = TxState(workflow="w", transaction_id="t-2", status="invoking", version=3)
        await store.save(live)
        final = msgspec.structs.replace(live, status="done", version=4)

        await store.finish(final, retention, forget=False)

        kept = await store.live_bucket.get("t-2")
        assert (kept is not None) == (retention > 0)
        expected = final if retention > 0 else None
        assert await store.read("t-2") == expected
        await store.forget("t-2")
        assert await store.live_bucket.get("t-2") is None
        assert await store.live() == []
        assert await store.read("t-2") == expected


@pytest.mark.anyio
async def test_a_finished_transaction_being_compensated_keeps_its_checkpoint() -> None:
    # A cancel reopened a finished (retained) transaction: its checkpoint is newer than the
    # retained copy, and a load (a takeover, a re-activation) must keep it, revision and all.
    async with MemoryTransport() as transport:
        store = KvStore(transport, prefix="reopen")
        await store.open()
        final = TxState(workflow="w", transaction_id="t-3", status="done", version=4)
        await store.finish(final, 60)
        compensating = msgspec.structs.replace(final, status="compensating", version=6)
        await store.save(compensating)

        other = KvStore(transport, prefix="reopen")  # another coordinator, after a takeover
        await other.open()
        loaded = await other.load("t-3")

        assert loaded == compensating
        assert [s.transaction_id for s in await store.live()] == ["t-3"]
        assert await store.read("t-3") == compensating
        # ... and the coordinator that loaded it writes it next with compare-and-set.
        owner = KvStore(transport, prefix="reopen")
        await owner.open()
        assert await owner.load("t-3") == compensating
        await owner.save(msgspec.structs.replace(compensating, version=7))
        assert (await store.read("t-3")).version == 7  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_a_finish_let_out_again_keeps_the_retained_copy() -> None:
    # A finish repeated (a restart or a takeover resumed a finished transaction) writes nothing;
    # a later finish (a cancel after done) replaces the copy in one write. Never is there a
    # moment without a retained copy (it used to be deleted and written again).
    async with MemoryTransport() as transport:
        store = KvStore(transport, prefix="again")
        await store.open()
        final = TxState(workflow="w", transaction_id="t-4", status="done", version=4)
        await store.finish(final, 60)
        first = await store.done.get("t-4")
        assert first is not None

        await store.finish(final, 60)  # let out again
        again = await store.done.get("t-4")
        assert again is not None
        assert again.revision == first.revision

        reverted = msgspec.structs.replace(final, status="reverted", version=9)
        await store.finish(reverted, 60)  # compensated after it was done
        assert await store.read("t-4") == reverted
        latest = await store.done.get("t-4")
        assert latest is not None
        assert latest.revision > first.revision
        await store.finish(final, 60)  # a stale finish changes nothing
        assert await store.read("t-4") == reverted
