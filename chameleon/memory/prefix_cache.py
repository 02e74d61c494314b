"""Content-addressed index of full KV blocks, for prefix caching (no torch; see docs/kv_cache.md).

A full block's key chains its parent's key, its token ids and a salt: the adapter's *content* hash
(never its name, so a re-used name with new weights cannot hit) and the KV dtype. Blocks are
reference counted; a block whose count drops to zero keeps its content and waits, least recently
used first, in `lru` until a hit revives it or an allocation takes it back. `KVBlockManager` owns
the free list and the budget; this class owns only the keys, the counts and the LRU order.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import attrs

BASE_MODEL_SALT = "base-model"  # the salt of requests without an adapter


def block_key(parent: bytes, token_ids: list[int], salt: str) -> bytes:
    """The key of one full block (blake2b-128 over the parent key, the tokens and the salt)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    h.update(salt.encode())
    return h.digest()


@attrs.define
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens looked up at admission
    hit_tokens: int = 0  # of those, found in the cache (not computed)
    evictions: int = 0  # cached blocks whose content was dropped


@attrs.define
class PrefixCache:
    """Keys of full blocks, their reference counts and the LRU of unreferenced cached blocks."""

    by_key: dict[bytes, int] = attrs.field(factory=dict)  # key -> block id
    key_of: dict[int, bytes] = attrs.field(factory=dict)  # block id -> key
    refs: dict[int, int] = attrs.field(factory=dict)  # block id -> holders (only blocks with >1 or cached)
    lru: OrderedDict[int, None] = attrs.field(factory=OrderedDict)  # cached, unreferenced; oldest first
    stats: PrefixStats = attrs.field(factory=PrefixStats)

    def lookup(self, key: bytes) -> int | None:
        return self.by_key.get(key)

    def register(self, block: int, key: bytes) -> None:
        """Index `block` under `key`, unless another block already holds that content."""
        if key not in self.by_key and block not in self.key_of:
            self.by_key[key] = block
            self.key_of[block] = key

    def ref(self, block: int) -> bool:
        """One more holder; True when the block came out of the LRU (it was idle)."""
        self.refs[block] = self.refs.get(block, 0) + 1
        return self.lru.pop(block, 0) is None

    def unref(self, block: int) -> bool:
        """One holder fewer; True when nobody holds it any more."""
        n = self.refs.get(block, 1) - 1
        if n > 0:
            self.refs[block] = n
            return False
        self.refs.pop(block, None)
        return True

    def park(self, block: int) -> bool:
        """An unreferenced block: cached (True) when it is indexed, else the caller frees it."""
        if block in self.key_of:
            self.lru[block] = None
            return True
        return False

    def evict_oldest(self) -> int:
        """Drop the least recently used cached block's content; returns the now free block."""
        block, _ = self.lru.popitem(last=False)
        del self.by_key[self.key_of.pop(block)]
        self.stats.evictions += 1
        return block
