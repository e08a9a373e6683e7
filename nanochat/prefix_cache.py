"""The prefix cache: keys and values of prompts already seen, kept in fixed-size blocks, so that a
request that starts like an earlier one prefills only what is new.

Chat clients resend the whole conversation every turn (the OpenAI API is stateless), and requests
of one application share a long system prompt. Without a cache, every turn prefills everything
again, and the time to the first token grows with the conversation.

Layout (paged KV): a pool of `num_blocks` blocks of `block_size` positions, per layer a
(num_blocks, block_size, kv_heads, head_dim) tensor for keys and one for values. A block holds the
keys and values of `block_size` consecutive tokens at fixed positions of a sequence; a position's
keys and values depend on every token before it, so a block is identified by the tokens it holds
and by its parent, the block before it (a hash chain over token ids: the dict key is (parent,
tokens), exact, with no hash collisions). The blocks form a tree rooted at position 0; a request
uses the longest chain that equals the start of its prompt.

The decode rows stay contiguous (nanochat.kv_cache): attention kernels (Flash Attention, SDPA)
read a row without a page table, so decoding pays nothing for the cache. A hit copies the chain's
blocks into the request's row, a memory copy of the keys and values, far cheaper than computing
them again (prefill costs a forward pass of every weight per token).

Lifetime: a running request holds a reference on every block of its chain (the ones it matched
and the ones its prompt added); held blocks are never evicted. When it finishes, the blocks of
what it wrote (prompt and reply) are added, its references dropped, and its blocks stay cached
until evicted: least recently used first, leaves before their parents (a parent is used whenever
a child is), when a new block needs room. When every block is held, new blocks are simply not
cached.

One thread only: the scheduler's decode loop owns the cache.
"""

import torch

from nanochat.kv_cache import KVCache

DEFAULT_BLOCK_SIZE = 16
_ROOT = -1  # the parent of a chain's first block


class PrefixCache:
    STAT_KEYS = ("prefix_hit_tokens", "prefix_prompt_tokens", "prefix_cached_blocks", "prefix_cache_blocks",
                 "prefix_block_size", "prefix_evictions")

    def __init__(self, num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r} must be a positive int")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be a positive int")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self._index: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent, tokens) -> block
        self._key: list[tuple[int, tuple[int, ...]] | None] = [None] * num_blocks  # None: free
        self._refs = [0] * num_blocks
        self._children = [0] * num_blocks
        self._last_used = [0] * num_blocks
        self._clock = 0
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self._evictable: set[int] = set()  # cached, unreferenced, childless
        self.hit_tokens = 0  # prompt tokens served from the cache, since the start
        self.prompt_tokens = 0  # prompt tokens looked up, since the start
        self.evictions = 0

    @classmethod
    def for_cache(cls, cache: KVCache, num_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE) -> "PrefixCache":
        """A pool of num_tokens // block_size blocks shaped like the decode cache's rows."""
        num_layers, _, _, num_kv_heads, head_dim = cache.k.shape
        return cls(num_tokens // block_size, block_size, num_layers, num_kv_heads, head_dim,
                   device=cache.k.device, dtype=cache.k.dtype)

    @property
    def num_blocks(self) -> int:
        return len(self._key)

    @property
    def cached_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def held(self, block: int) -> bool:
        return self._refs[block] > 0

    def stats(self) -> dict:
        return dict(zip(self.STAT_KEYS, (self.hit_tokens, self.prompt_tokens, self.cached_blocks, self.num_blocks,
                                         self.block_size, self.evictions)))

    # ---------------------------------------------------------------- lookups

    def acquire_prefix(self, prompt: list[int]) -> list[int]:
        """The blocks of the longest cached chain that starts `prompt` and leaves at least its last
        token out (a prefill must compute that token's logits), each now held by the caller."""
        self.prompt_tokens += len(prompt)
        chain, parent = [], _ROOT
        for start in range(0, len(prompt) - self.block_size, self.block_size):
            block = self._index.get((parent, tuple(prompt[start:start + self.block_size])))
            if block is None:
                break
            chain.append(block)
            parent = block
        for block in chain:
            self._hold(block)
        self.hit_tokens += len(chain) * self.block_size
        return chain

    def copy_into(self, chain: list[int], cache: KVCache, row: int) -> int:
        """Write the keys and values of `chain` at the first positions of `row` of `cache`; returns
        how many positions they fill (the row's new length)."""
        length = len(chain) * self.block_size
        if chain:
            index = torch.tensor(chain, device=self.k.device)
            shape = (self.k.size(0), length) + tuple(self.k.shape[3:])
            cache.k[:, row, :length] = self.k[:, index].reshape(shape)
            cache.v[:, row, :length] = self.v[:, index].reshape(shape)
        return length

    # ---------------------------------------------------------------- additions

    def add(self, tokens: list[int], cache: KVCache, row: int, chain: list[int]) -> list[int]:
        """Add the full blocks of `tokens` (whose keys and values fill the first positions of `row` of
        `cache`) that follow `chain`, a chain the caller holds that starts them; returns the new
        blocks the caller now holds as well (those already cached are shared, not copied). Stops
        early, caching less, when every block is held."""
        parent = chain[-1] if chain else _ROOT
        added = []
        for start in range(len(chain) * self.block_size, len(tokens) - self.block_size + 1, self.block_size):
            key = (parent, tuple(tokens[start:start + self.block_size]))
            block = self._index.get(key)
            if block is None:
                block = self._allocate()
                if block is None:
                    break
                stop = start + self.block_size
                self.k[:, block] = cache.k[:, row, start:stop]
                self.v[:, block] = cache.v[:, row, start:stop]
                self._index[key], self._key[block] = block, key
                if parent != _ROOT:
                    self._children[parent] += 1
                    self._evictable.discard(parent)
            self._hold(block)
            added.append(block)
            parent = block
        return added

    def release(self, blocks: list[int]) -> None:
        """Drop the caller's hold on `blocks`; they stay cached until evicted."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0 and self._children[block] == 0:
                self._evictable.add(block)

    def clear(self) -> None:
        """Forget every block that no one holds (the model's weights changed, or a test wants a
        cold cache); held blocks stay until released."""
        while self._evictable:
            self._evict(next(iter(self._evictable)))

    # ---------------------------------------------------------------- internals

    def _hold(self, block: int) -> None:
        self._refs[block] += 1
        self._clock += 1
        self._last_used[block] = self._clock
        self._evictable.discard(block)

    def _allocate(self) -> int | None:
        if not self._free:
            if not self._evictable:
                return None
            self._evict(min(self._evictable, key=self._last_used.__getitem__))
            self.evictions += 1
        return self._free.pop()

    def _evict(self, block: int) -> None:
        parent, _ = key = self._key[block]
        del self._index[key]
        self._key[block] = None
        self._evictable.discard(block)
        self._free.append(block)
        if parent != _ROOT:
            self._children[parent] -= 1
            if self._children[parent] == 0 and self._refs[parent] == 0:
                self._evictable.add(parent)
