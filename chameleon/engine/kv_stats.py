"""Glue between the engine core and prefix caching: the salt of a request's KV and the stats.

The salt is everything besides the tokens that decides a block's KV: the adapter's *content*
hash (so removing an adapter and registering other weights under the same name never hits the
old blocks), the model dtype, the KV cache dtype and the bounded window (sinks, recent tokens). No torch here (the core imports this).
"""

from __future__ import annotations

from chameleon.config import EngineConfig
from chameleon.engine.stats import PrefixCacheStats
from chameleon.memory.kv_blocks import KVBlockManager
from chameleon.memory.prefix_cache import BASE_MODEL_SALT
from chameleon.outputs import AdapterInfo


def prefix_salt(adapter: AdapterInfo | None, config: EngineConfig) -> str:
    """The salt of a request's block keys (see the module docstring)."""
    if adapter is None:
        who = BASE_MODEL_SALT
    elif adapter.content_hash:
        who = f"adapter:{adapter.content_hash}"
    else:  # no content hash (should not happen): the object identity, never the name alone
        who = f"adapter-object:{id(adapter)}:{adapter.name}"
    salt = f"{who}|dtype={config.dtype}|kv={config.kv_cache_dtype}"
    w = config.kv_window  # a windowed block's KV saw only its window: another KV than full attention's
    return salt if w is None else f"{salt}|window={w.sink_tokens},{w.recent_tokens}"


def prefix_stats(blocks: KVBlockManager) -> PrefixCacheStats:
    cache = blocks.prefix
    if cache is None:
        return PrefixCacheStats()
    return PrefixCacheStats(
        enabled=True,
        queried_tokens=cache.stats.queried_tokens,
        hit_tokens=cache.stats.hit_tokens,
        cached_blocks=len(cache.lru),
        indexed_blocks=len(cache.key_of),
        evictions=cache.stats.evictions,
    )
