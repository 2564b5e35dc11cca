"""The worker's RocksDB table store: Faust's ``rocksdb`` store (through ``rocksdict``), placing
each key by the same murmur2 partitioner as the table's changelog.

Faust's own RocksDB store picks a key's partition from the *current stream event*. The engine
writes a whole batch of users after the batch (and timers write outside any event), so the
current event says nothing about the key; this store computes it from the key, exactly as the
changelog's producer does (Kafka's default partitioner: ``murmur2(key) & 0x7fffffff``
modulo the partition count). Registered as the store scheme ``clickpulse-rocksdb://``.

The local database is a spill of the table to disk (bounded memory), not the source of
truth: the worker wipes it at start (:func:`wipe_local_tables`) and recovers the table from its
changelog topic, so a SIGKILL can never leave a local state that is ahead of the changelog.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from aiokafka.partitioner import murmur2
from faust.stores import STORES
from faust.stores.rocksdb import Store as _RocksDBStore

SCHEME = "clickpulse-rocksdb"


def key_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner: the partition of ``key`` among ``partitions``.

    >>> key_partition(b"550121407", 4) == key_partition(b"550121407", 4)
    True
    """
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class Store(_RocksDBStore):
    """Faust's RocksDB store with key-determined partitions (see the module docstring)."""

    def _partition(self, key: bytes) -> int:
        return key_partition(key, self.table.partitions or self.app.conf.topic_partitions)

    def _set(self, key: bytes, value: bytes | None) -> None:
        p = self._partition(key)
        self._key_index[key] = p
        self._db_for_partition(p).put(key, value)

    def _get(self, key: bytes) -> bytes | None:
        db = self._dbs.get(self._partition(key))
        return None if db is None else db.get(key)

    def _del(self, key: bytes) -> None:
        db = self._dbs.get(self._partition(key))
        if db is not None:
            db.delete(key)
        self._key_index.pop(key, None)

    def _contains(self, key: bytes) -> bool:
        return self._get(key) is not None


STORES.aliases[SCHEME] = f"{__name__}:Store"


def wipe_local_tables(app: Any) -> None:
    """Delete the app's local table databases (they are rebuilt from the changelogs)."""
    path = Path(app.conf.tabledir)
    if path.exists():
        shutil.rmtree(path)
