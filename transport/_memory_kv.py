"""Key-value buckets in memory."""

from __future__ import annotations

import functools
import time

from ._contract import Entry, KeyExistsError, KeyValue, RevisionMismatchError
from ._scheduler import Scheduler
from ._subjects import check_key


class _Item:
    """A key's current value; replaced, never changed, on every write."""

    __slots__ = ("expires", "revision", "ttl", "value")

    def __init__(
        self, value: bytes, revision: int, ttl: float | None, expires: float | None
    ) -> None:
        self.value = value
        self.revision = revision
        self.ttl = ttl  # the key's own ttl, kept across writes
        self.expires = expires  # monotonic deadline, from the key's or the bucket's ttl


def check_settings(ttl: float | None, history: int) -> None:
    """Raise ``ValueError`` unless these are valid bucket settings."""
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be positive seconds or None, not {ttl}")
    if not 1 <= history <= 64:
        raise ValueError(f"history must be between 1 and 64, not {history}")


class MemoryKeyValue(KeyValue):
    """A bucket in memory: the latest value of each key (no history is kept or exposed).

    Expired keys are removed by a scheduled callback and, should a read come first, by the read.
    """

    __slots__ = ("_items", "_revision", "_scheduler", "bucket", "history", "ttl")

    def __init__(self, bucket: str, ttl: float | None, history: int, scheduler: Scheduler) -> None:
        self.bucket = bucket
        self.ttl = ttl
        self.history = history
        self._scheduler = scheduler
        self._items: dict[str, _Item] = {}
        self._revision = 0

    def __repr__(self) -> str:
        return f"<MemoryKeyValue {self.bucket!r}>"

    async def get(self, key: str) -> Entry | None:
        check_key(key)
        item = self._live(key)
        await self._scheduler.tick()
        return None if item is None else Entry(key, item.value, item.revision)

    async def put(self, key: str, value: bytes) -> int:
        check_key(key)
        item = self._live(key)
        revision = self._write(key, value, None if item is None else item.ttl)
        await self._scheduler.tick()
        return revision

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        check_key(key)
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be positive seconds or None, not {ttl}")
        item = self._live(key)
        if item is not None:
            raise KeyExistsError(
                f"key {key!r} already exists in bucket {self.bucket!r} (revision {item.revision})"
            )
        revision = self._write(key, value, ttl)
        await self._scheduler.tick()
        return revision

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        check_key(key)
        item = self._live(key)
        if item is None or item.revision != last_revision:
            raise self._mismatch(key, item, last_revision)
        revision = self._write(key, value, item.ttl)
        await self._scheduler.tick()
        return revision

    async def delete(self, key: str, *, last_revision: int | None = None) -> None:
        check_key(key)
        item = self._live(key)
        if last_revision is not None and (item is None or item.revision != last_revision):
            raise self._mismatch(key, item, last_revision)
        if item is not None:
            del self._items[key]
        await self._scheduler.tick()

    async def keys(self) -> list[str]:
        now = time.monotonic()
        items = self._items
        for key in [k for k, i in items.items() if i.expires is not None and i.expires <= now]:
            del items[key]
        await self._scheduler.tick()
        return list(items)

    def _live(self, key: str) -> _Item | None:
        item = self._items.get(key)
        if item is not None and item.expires is not None and item.expires <= time.monotonic():
            del self._items[key]
            return None
        return item

    def _write(self, key: str, value: bytes, ttl: float | None) -> int:
        self._revision += 1
        lifetime = self.ttl if ttl is None else ttl
        expires = None if lifetime is None else time.monotonic() + lifetime
        item = self._items[key] = _Item(value, self._revision, ttl, expires)
        if expires is not None:
            self._scheduler.call_at(expires, functools.partial(self._expire, key, item))
        return self._revision

    def _expire(self, key: str, item: _Item) -> None:
        if self._items.get(key) is item:  # not rewritten or deleted since
            del self._items[key]

    def _mismatch(self, key: str, item: _Item | None, last_revision: int) -> RevisionMismatchError:
        current = "absent" if item is None else f"at revision {item.revision}"
        return RevisionMismatchError(
            f"key {key!r} in bucket {self.bucket!r} is {current}, not at revision "
            f"{last_revision}: read it again"
        )
