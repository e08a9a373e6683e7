"""One attention interface for the GPT model, in the Flash Attention calling convention.

The model calls two functions and never cares which kernel runs underneath:

    flash_attn_func(q, k, v, causal=True, window_size=(-1, -1))            # training, prefill
    flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, ...)  # decoding

Tensors are laid out (batch, time, heads, head_dim), keys and values may have fewer heads than
the queries (grouped-query attention), and `window_size=(left, right)` limits how far back
(left) and ahead (right) a query may look, -1 meaning unlimited, exactly as Flash Attention
defines it. The semantics follow Flash Attention so that the fast kernels are drop-in:

- Flash Attention 3 on Hopper GPUs (sm90), loaded through the `kernels` hub package;
- Flash Attention 2 (`flash_attn`) on other CUDA GPUs of compute capability 8.0 and newer;
- PyTorch's scaled_dot_product_attention everywhere else (CPU, MPS, older GPUs, fp32 tensors),
  with an explicit mask for sliding windows and for KV-cache rows at different positions (built
  once per forward pass for all layers: see RowPositions).
  When every row of a KV cache is at the same position (cache_seqlens given as an int), the
  fallback slices the cache instead of masking it, and a single decoding query runs unmasked:
  on a CPU the mask's construction, not the attention, was most of a small model's step.

The backend is chosen once per process, on first use, and logged once on the "nanochat" logger.
Choosing lazily keeps CPU-only processes (data workers) from probing for GPU kernels. The choice
itself is kept out of torch.compile: `GPT.__init__` makes it, so a model is never traced before
its process has chosen (a choice inside the trace would break the graph at every layer).
Set NANOCHAT_ATTENTION=sdpa to force the PyTorch fallback (for comparisons and debugging), or
fa3/fa2 to insist on a kernel and fail loudly where it cannot load.
"""

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger("nanochat")

BACKEND_CHOICES = ("auto", "fa3", "fa2", "sdpa")

# The dtypes each kernel accepts. The FA3 build on the kernels hub ships bf16 (and fp8) Hopper
# kernels only; FA2 takes both half-precision formats. Any other dtype runs on SDPA for that call.
_KERNEL_DTYPES = {"fa3": (torch.bfloat16,), "fa2": (torch.float16, torch.bfloat16)}

# enable_gqa arrived in PyTorch 2.5; older versions get the key/value heads repeated instead.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)

# (name, module with flash_attn_func / flash_attn_with_kvcache, or None for SDPA), once resolved.
_backend: tuple[str, object] | None = None


def _load_fa3():
    """The FA3 interface module on a Hopper GPU, or None with the reason why not."""
    if not torch.cuda.is_available():
        return None, "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    # The published FA3 kernels are compiled for sm90 only; Ada and Blackwell cannot run them.
    if major != 9:
        return None, f"GPU is sm{major}{minor}, FA3 needs sm90"
    try:
        # The hub download would otherwise draw progress bars into every Ray worker's log.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from kernels import get_kernel
        return get_kernel("varunneal/flash-attention-3").flash_attn_interface, ""
    except Exception as error:  # any failure (package missing, no network, ABI mismatch) falls back
        return None, f"loading FA3 through `kernels` failed: {error!r}"


def _load_fa2():
    """The flash_attn (FA2) module on an sm80+ GPU, or None with the reason why not."""
    if not torch.cuda.is_available():
        return None, "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return None, f"GPU is sm{major}{minor}, FA2 needs sm80 or newer"
    try:
        import flash_attn
        return flash_attn, ""
    except Exception as error:
        return None, f"importing flash_attn failed: {error!r}"


def _select_backend(requested: str) -> tuple[str, object]:
    """Pick the fastest available backend, honouring an explicit request."""
    requested = (requested or "auto").strip().lower()
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"NANOCHAT_ATTENTION={requested!r} is not one of {BACKEND_CHOICES}; "
                         f"unset it to choose automatically, or set it to 'sdpa' to force PyTorch SDPA")
    if requested == "sdpa":
        logger.info("attention backend: sdpa (forced by NANOCHAT_ATTENTION)")
        return "sdpa", None
    reasons = []
    for name, loader in (("fa3", _load_fa3), ("fa2", _load_fa2)):
        if requested not in ("auto", name):
            continue
        module, reason = loader()
        if module is not None:
            dtypes = "/".join(str(dtype).removeprefix("torch.") for dtype in _KERNEL_DTYPES[name])
            logger.info(f"attention backend: {name} (for {dtypes} CUDA tensors; other inputs use sdpa)")
            return name, module
        reasons.append(f"{name}: {reason}")
    if requested != "auto":
        raise RuntimeError(f"NANOCHAT_ATTENTION={requested} but {'; '.join(reasons)}. "
                           f"Unset NANOCHAT_ATTENTION to fall back automatically.")
    logger.info(f"attention backend: sdpa ({'; '.join(reasons)})")
    return "sdpa", None


def _resolve_backend() -> tuple[str, object]:
    """The chosen backend, chosen now if need be. Loading kernels is I/O, not tensor math: a choice
    made under torch.compile's trace runs outside it, through torch.compiler.disable. The disable is
    applied only then, when torch._dynamo is loaded anyway: importing it costs a second, which every
    process that builds a model would pay. The hot path reads the resolved global first, so after
    the first call no graph break remains."""
    global _backend
    if _backend is None:
        if torch.compiler.is_compiling():
            return torch.compiler.disable(_resolve_backend)()
        _backend = _select_backend(os.environ.get("NANOCHAT_ATTENTION", "auto"))
    return _backend


def attention_backend() -> str:
    """The backend this process uses for half-precision CUDA inputs: 'fa3', 'fa2' or 'sdpa'."""
    return (_backend or _resolve_backend())[0]


def _kernel_for(q: torch.Tensor):
    """The Flash Attention module that can run this call, or None to use SDPA."""
    name, module = _backend or _resolve_backend()
    if module is None or not q.is_cuda or q.dtype not in _KERNEL_DTYPES[name]:
        return None
    return module


def _check_window(window_size) -> tuple[int, int]:
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints (left, right), each >= 0 or -1 for "
                         f"unlimited; got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, what: str) -> None:
    """Shapes must follow (batch, time, heads, head_dim) with grouped key/value heads."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q and {what} must be 4-D (batch, time, heads, head_dim); got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{what} keys and values must have the same shape; got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if k.size(0) != q.size(0) or k.size(3) != q.size(3):
        raise ValueError(f"q {tuple(q.shape)} and {what} {tuple(k.shape)} must agree on batch size "
                         f"and head_dim")
    if q.size(2) % k.size(2) != 0:
        raise ValueError(f"the number of query heads ({q.size(2)}) must be a multiple of the number "
                         f"of key/value heads ({k.size(2)}) for grouped-query attention")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _visible(query_minus_key: torch.Tensor, causal: bool, window_size: tuple[int, int]) -> torch.Tensor:
    """Boolean mask: may a query see a key, given (query position - key position)?"""
    left, right = window_size
    visible = torch.ones_like(query_minus_key, dtype=torch.bool)
    if causal:
        right = 0  # causal attention never looks ahead, whatever the right window says
    if right >= 0:
        visible &= query_minus_key >= -right
    if left >= 0:
        visible &= query_minus_key <= left
    return visible


def _sdpa(q, k, v, attn_mask=None, is_causal=False) -> torch.Tensor:
    """SDPA on (batch, heads, time, head_dim) tensors with grouped key/value heads."""
    grouped = q.size(1) != k.size(1)
    if grouped and not _SDPA_HAS_GQA:
        group = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        grouped = False
    if grouped:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    window_size=(-1, -1)) -> torch.Tensor:
    """Attention over one sequence batch: q (B, T, H, D), k and v (B, T, Hkv, D) -> (B, T, H, D).

    With causal=True query i sees key j iff j <= i and i - j <= left (left=-1: no limit).
    Without causal, j must also satisfy j - i <= right when right >= 0.
    """
    window_size = _check_window(window_size)
    _check_qkv(q, k, v, "k/v")
    if k.size(1) != q.size(1):
        raise ValueError(f"flash_attn_func needs as many keys as queries (got {k.size(1)} and "
                         f"{q.size(1)}); use flash_attn_with_kvcache to attend over a cache")
    kernel = _kernel_for(q)
    if kernel is not None:
        return kernel.flash_attn_func(q, k, v, causal=causal, window_size=window_size)

    T = q.size(1)
    left, right = window_size
    # A window at least as long as the sequence limits nothing, so the unmasked kernels apply.
    looks_back_fully = left < 0 or left >= T - 1
    looks_ahead_fully = not causal and (right < 0 or right >= T - 1)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if causal and looks_back_fully:
        y = _sdpa(qh, kh, vh, is_causal=True)
    elif looks_back_fully and looks_ahead_fully:
        y = _sdpa(qh, kh, vh)
    else:
        positions = torch.arange(T, device=q.device)
        mask = _visible(positions[:, None] - positions[None, :], causal, window_size)
        y = _sdpa(qh, kh, vh, attn_mask=mask)
    return y.transpose(1, 2)


class RowPositions:
    """Where the rows of a KV cache stand during one forward pass: `cache_seqlens` (an int32
    tensor of the rows' filled lengths) with what attention on the SDPA fallback derives from it,
    worked out on first use and reused by every later layer of the pass. Without it each layer of a
    decoding step over rows at different positions would read the lengths back, build the write
    slots and build the mask again: at depth 1 with 32 rows on a CPU that repetition was a third of
    the attention call. Flash Attention kernels take `cache_seqlens` itself.

    Valid for one pass only: build a new one after the lengths change."""

    def __init__(self, cache_seqlens: torch.Tensor, lengths: list[int] | None = None):
        self.cache_seqlens = cache_seqlens
        # One host read of the lengths serves every check and tells how much of the cache is worth reading.
        self.lengths = cache_seqlens.tolist() if lengths is None else lengths
        self.shortest, self.longest = min(self.lengths), max(self.lengths)
        self.start = cache_seqlens.to(torch.long)  # (batch,): the first position each row writes
        self._derived: dict = {}  # write slots and masks, by what they depend on

    def new_token_positions(self, query_len: int) -> torch.Tensor:
        """Absolute positions (batch, query_len) of the tokens this pass writes."""
        start = self.start[:, None]
        return start if query_len == 1 else start + torch.arange(query_len, device=start.device)

    def flat_slots(self, query_len: int, cache_len: int) -> torch.Tensor:
        """The positions (batch * query_len,) that new keys take in a contiguous cache of
        `cache_len` positions per row, flattened to (batch * cache_len) positions: row b's start
        at b * cache_len."""
        key = ("slots", query_len, cache_len)
        if key not in self._derived:
            start = self.start
            flat = start + torch.arange(0, start.numel() * cache_len, cache_len, device=start.device)
            if query_len > 1:
                flat = (flat[:, None] + torch.arange(query_len, device=start.device)).view(-1)
            self._derived[key] = flat
        return self._derived[key]

    def mask(self, query_len: int, new_keys: int, causal: bool, window_size: tuple[int, int],
             dtype: torch.dtype) -> torch.Tensor:
        """The additive attention mask (batch, 1, query_len, longest key) in `dtype`: 0 where a
        query may see a key, -inf where not. Query t of row b sits at position
        start[b] + new_keys - query_len + t. Additive, not boolean: SDPA turns a boolean mask into
        this one on every call, so once per pass saves that conversion in every later layer."""
        key = ("mask", query_len, new_keys, causal, window_size, dtype)
        if key not in self._derived:
            start = self.start
            batch = start.numel()
            key_positions = torch.arange(self.longest + new_keys, device=start.device)
            if query_len == 1:
                # A decoding step: each row's one query is its newest key (at `start` when it was
                # just written, else the last filled one), so it sees the row's keys up to that one
                # that its left window reaches (nothing lies ahead of it).
                newest = (start if new_keys else start - 1)[:, None]
                visible = key_positions <= newest
                if window_size[0] >= 0:
                    visible &= key_positions >= newest - window_size[0]
                visible = visible.view(batch, 1, 1, -1)
            else:
                key_lens = start + new_keys
                offsets = torch.arange(query_len, device=start.device)
                query_positions = key_lens[:, None] - query_len + offsets[None, :]  # (B, Tq)
                visible = _visible(query_positions[:, :, None] - key_positions[None, None, :], causal, window_size)
                visible &= key_positions[None, None, :] < key_lens[:, None, None]  # unfilled slots never count
                visible = visible[:, None]
            self._derived[key] = torch.full(visible.shape, float("-inf"), dtype=dtype,
                                            device=start.device).masked_fill_(visible, 0.0)
        return self._derived[key]


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            cache_seqlens: torch.Tensor | RowPositions | int | None = None, causal: bool = True,
                            window_size=(-1, -1)) -> torch.Tensor:
    """Attention of new queries over a preallocated KV cache, in Flash Attention's semantics.

    q: (B, Tq, H, D); k_cache, v_cache: (B, Tmax, Hkv, D); cache_seqlens: int32 (B,) (or an int for
    all rows, or a RowPositions that carries the tensor through the layers of one pass), how many
    positions of each row's cache are already valid. When k and v (B, Tq, Hkv, D)
    are given they are written in place at positions cache_seqlens[b] .. cache_seqlens[b] + Tq - 1
    of row b, and query t of row b sits at position cache_seqlens[b] + t. Without k and v the cache
    must already hold the queries' own keys, and cache_seqlens counts them (query t sits at
    cache_seqlens[b] - Tq + t). cache_seqlens itself is never modified: the caller advances it.
    """
    window_size = _check_window(window_size)
    _check_qkv(q, k_cache, v_cache, "k_cache/v_cache")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v to append to the cache, or neither")
    if k is not None:
        _check_qkv(q, k, v, "k/v")
        if k.size(1) != q.size(1) or k.size(2) != k_cache.size(2):
            raise ValueError(f"new k/v {tuple(k.shape)} must have q's length {q.size(1)} and the "
                             f"cache's {k_cache.size(2)} key/value heads")
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is required: a (batch,) int32 tensor with the number of "
                         "positions already filled in each row's cache")
    batch, query_len = q.shape[:2]
    kernel = _kernel_for(q)
    if isinstance(cache_seqlens, int) and kernel is None:
        return _sdpa_at_one_position(q, k_cache, v_cache, k, v, cache_seqlens, causal, window_size)
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    rows = cache_seqlens if isinstance(cache_seqlens, RowPositions) else None
    seqlens = rows.cache_seqlens if rows is not None else cache_seqlens
    if seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},), one length per row; got "
                         f"{tuple(seqlens.shape)}")

    if kernel is not None:
        return kernel.flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens.to(q.device, torch.int32),
            causal=causal, window_size=window_size)

    if rows is None or seqlens.device != q.device:
        rows = RowPositions(seqlens.to(q.device), rows.lengths if rows is not None else None)
    new_keys = query_len if k is not None else 0
    # Only the first `longest` positions can be visible to anyone: reading the rest of a long
    # cache would cost time on every decoded token for keys that are masked out anyway.
    longest = rows.longest + new_keys
    _check_cache_bounds(rows.shortest, longest, query_len, k is not None, k_cache.size(1), rows.lengths)
    if k is not None:
        _write_at_rows(k_cache, v_cache, k, v, rows)
    mask = rows.mask(query_len, new_keys, causal, window_size, q.dtype)
    y = _sdpa(q.transpose(1, 2), k_cache[:, :longest].transpose(1, 2),
              v_cache[:, :longest].transpose(1, 2), attn_mask=mask)
    return y.transpose(1, 2)


def _write_at_rows(k_cache, v_cache, k, v, rows: RowPositions) -> None:
    """Write the new keys and values k, v (B, Tq, Hkv, D) of row b at positions start[b] ..
    start[b] + Tq - 1 of the caches (B, Tmax, Hkv, D). A contiguous cache takes them with one
    index_copy_ into its flattened (B * Tmax) positions, cheaper than indexing rows and positions."""
    batch, query_len = k.shape[:2]
    if k_cache.is_contiguous() and v_cache.is_contiguous():
        flat = rows.flat_slots(query_len, k_cache.size(1))
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, flat, k.reshape(-1, *k.shape[2:]))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, flat, v.reshape(-1, *v.shape[2:]))
    else:
        start = rows.start
        slots = start[:, None] + torch.arange(query_len, device=start.device)  # (B, Tq)
        row_ids = torch.arange(batch, device=start.device)[:, None]
        k_cache[row_ids, slots] = k
        v_cache[row_ids, slots] = v


def _check_cache_bounds(shortest_start: int, longest: int, query_len: int, new_keys: bool, cache_positions: int,
                        shown_seqlens) -> None:
    """ValueError unless every row's filled length is >= 0, the longest row (with the new keys)
    fits the cache, and without new keys the cache already holds the queries' own keys."""
    if shortest_start < 0:
        raise ValueError(f"cache_seqlens must be >= 0; got {shown_seqlens}")
    if longest > cache_positions:
        raise ValueError(f"the KV cache holds {cache_positions} positions but a row needs {longest} "
                         f"(cache_seqlens {shown_seqlens} plus {query_len if new_keys else 0} new); "
                         f"allocate a longer cache")
    if not new_keys and shortest_start < query_len:
        raise ValueError(f"without new k/v, cache_seqlens must count the {query_len} query tokens "
                         f"already in the cache; got {shown_seqlens}")


def _sdpa_at_one_position(q, k_cache, v_cache, k, v, start: int, causal: bool,
                          window_size: tuple[int, int]) -> torch.Tensor:
    """flash_attn_with_kvcache on SDPA when every row's cache holds `start` positions.

    This is the decoding case of one prompt and its samples, and of every prefill into an empty
    row. The rows need no mask of their own: the new keys go in with one slice, the keys a window
    hides in front of the queries are sliced off, and a single query (the decoding step) sees
    every key that is left, so it runs unmasked. Several queries over a filled prefix still need
    the causal mask, built once for all rows.
    """
    query_len = q.size(1)
    key_len = start + query_len if k is not None else start
    _check_cache_bounds(start, key_len, query_len, k is not None, k_cache.size(1), start)
    if k is not None:
        k_cache[:, start:key_len] = k
        v_cache[:, start:key_len] = v
    first_query = key_len - query_len
    left, right = window_size
    # Keys before the first query's window are hidden from every query.
    first_key = 0 if left < 0 else max(0, first_query - left)
    qh = q.transpose(1, 2)
    kh = k_cache[:, first_key:key_len].transpose(1, 2)
    vh = v_cache[:, first_key:key_len].transpose(1, 2)
    if query_len == 1:
        # The only query is the newest position: no key lies ahead of it, none is left outside its window.
        y = _sdpa(qh, kh, vh)
    elif causal and first_query == 0 and (left < 0 or left >= query_len - 1):
        y = _sdpa(qh, kh, vh, is_causal=True)  # a prefill from position 0: plain causal attention
    else:
        query_positions = torch.arange(first_query, key_len, device=q.device)
        key_positions = torch.arange(first_key, key_len, device=q.device)
        mask = _visible(query_positions[:, None] - key_positions[None, :], causal, window_size)
        y = _sdpa(qh, kh, vh, attn_mask=mask)
    return y.transpose(1, 2)
