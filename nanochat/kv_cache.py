"""The KV cache used for decoding: per layer a (batch, time, kv_heads, head_dim) tensor for keys
and one for values, in the layout the attention interface (nanochat.flash_attention) expects,
plus one position per row, and per row the normalized embedding of the last token written (the
model's smear mixes it into the next token, which a decoding step alone would not see).

A position per row (rather than one for the whole batch) is what lets the continuous-batching
scheduler keep sequences of different lengths in one decode batch: each row's new token is written
at its own position and rotated by its own rotary angle.

Two more operations serve the scheduler and the engine, which keep their live sequences packed
into the first rows of one preallocated cache: `rows(start, stop)` is a cache over a slice of the
rows that shares the memory (a forward pass on it writes straight into the big cache, and the
model never runs on idle rows), and `move_row(source, target)` copies one row's filled prefix over
another, to close the gap a finished sequence leaves.
"""

import torch

from nanochat.common import COMPUTE_DTYPE


class KVCache:
    def __init__(self, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                 num_layers: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 embedding_dim: int = 0):
        dtype = dtype or COMPUTE_DTYPE
        shape = (num_layers, batch_size, max_seq_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        # Meaningful only in rows that hold tokens; the model ignores it in empty rows.
        self.prev_embedding = torch.zeros(batch_size, embedding_dim, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, model, batch_size: int, max_seq_len: int) -> "KVCache":
        """A cache shaped for `model` (a nanochat.gpt.GPT), on the model's device."""
        cfg = model.config
        return cls(batch_size, cfg.n_kv_head, max_seq_len, cfg.n_embd // cfg.n_head, cfg.n_layer,
                   device=model.get_device(), embedding_dim=cfg.n_embd)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_seq_len(self) -> int:
        return self.k.size(2)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (keys, values) cache views of one layer, each (batch, time, kv_heads, head_dim)."""
        return self.k[layer_idx], self.v[layer_idx]

    def advance(self, num_tokens: int | torch.Tensor) -> None:
        """Move every row forward after a forward pass wrote `num_tokens` tokens into it (an int
        for all rows, or a (batch,) tensor of each row's own count)."""
        self.cache_seqlens += num_tokens

    def get_pos(self) -> int:
        """The common position of all rows (the seed's single-position view of the cache)."""
        first = int(self.cache_seqlens[0])
        if not bool((self.cache_seqlens == first).all()):
            raise ValueError("rows of this KV cache are at different positions; use cache_seqlens")
        return first

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows [start, stop) that shares this cache's memory: writes and position
        advances made through it land in this cache."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows [{start}, {stop}) are not a non-empty range inside the cache's "
                             f"{self.batch_size} rows")
        view = object.__new__(KVCache)
        view.k = self.k[:, start:stop]
        view.v = self.v[:, start:stop]
        view.cache_seqlens = self.cache_seqlens[start:stop]
        view.prev_embedding = self.prev_embedding[start:stop]
        return view

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source` (its filled positions, length and last embedding) over row `target`, then mark
        `source` empty (nothing happens when they are the same row)."""
        for row in (source, target):
            if not 0 <= row < self.batch_size:
                raise ValueError(f"row {row} is outside the cache's {self.batch_size} rows")
        if source == target:
            return
        length = int(self.cache_seqlens[source])
        self.k[:, target, :length] = self.k[:, source, :length]
        self.v[:, target, :length] = self.v[:, source, :length]
        self.cache_seqlens[target] = length
        self.prev_embedding[target] = self.prev_embedding[source]
        self.cache_seqlens[source] = 0

    def reset(self) -> None:
        self.cache_seqlens.zero_()

    def prefill_from(self, other: "KVCache", source_row: int = 0) -> None:
        """Copy row `source_row` of `other` into every row of this cache (one prompt, many samples)."""
        length = int(other.cache_seqlens[source_row])
        if length > self.max_seq_len:
            raise ValueError(f"cannot copy a {length}-token prefix into a cache of {self.max_seq_len}")
        self.k[:, :, :length] = other.k[:, source_row:source_row + 1, :length]
        self.v[:, :, :length] = other.v[:, source_row:source_row + 1, :length]
        self.prev_embedding[:] = other.prev_embedding[source_row]
        self.cache_seqlens.fill_(length)
