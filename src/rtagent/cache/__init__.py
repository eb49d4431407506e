"""Caches that make a repeated question cheap: tool results, and whole replies.

- ``cached(tool, ttl=60)``: a tool's result for the same arguments, shared by identical calls in
  flight (``_tools``); in memory, or on the Redis of ``configure_cache(url)``.
- ``ReplyCache("exact" | "semantic")``: a stored reply streamed again for the same agent, history
  and message, or (``semantic``) a message that means the same (``_replies``, with the embedding
  model of ``_embedding``, the ``rtagent[cache]`` extra).

The model's own prompt cache needs nothing of these: ``openai:`` models get a ``prompt_cache_key``
per agent (``_served``), and every request's fixed prefix stays byte-identical.
"""

from ._replies import ReplyCache, replayable
from ._tools import CachedTool, cached, clear_cache, configure_cache

__all__ = ["CachedTool", "ReplyCache", "cached", "clear_cache", "configure_cache", "replayable"]
