"""Tests for nanochat.flash_attention: the SDPA backend against a float64 attention written out
by hand, for training (full sequences, sliding windows, grouped heads) and for decoding through a
KV cache whose rows sit at different positions.

Tolerance: inputs are fp32 (eps 1.2e-7) with values O(1), head_dim 8 and at most ~24 keys, so the
rounding error of scores, softmax and weighted sum stays near 1e-6. FP32_TOL = 1e-5 leaves a margin
of 10x, while one key wrongly masked or unmasked moves an output by about 1/24 of a value (~1e-2).
"""

import logging

import pytest
import torch

from nanochat import flash_attention
from nanochat.flash_attention import RowPositions, attention_backend, flash_attn_func, flash_attn_with_kvcache

FP32_TOL = 1e-5
HEAD_DIM = 8
# Stand-in for stale cache contents: finite (so that a correctly masked slot contributes exactly
# 0 * value = 0) but big enough that any leak into the output is unmistakable.
STALE = 1e4


def naive_attention(q, k, v, query_positions, causal=True, window_size=(-1, -1)):
    """Float64 reference for one row. q (Tq, H, D), k and v (Tk, Hkv, D); query t sits at
    position query_positions[t] and key j at position j. Query head h reads key/value head
    h // (H // Hkv), the grouping Flash Attention uses."""
    q, k, v = q.double(), k.double(), v.double()
    query_len, n_head, dim = q.shape
    key_len, n_kv_head, _ = k.shape
    left, right = window_size
    allowed = torch.zeros(query_len, key_len, dtype=torch.bool)
    for t in range(query_len):
        for j in range(key_len):
            back = query_positions[t] - j  # how far behind the query this key is
            ahead_ok = back >= 0 if causal else (right < 0 or -back <= right)
            back_ok = left < 0 or back <= left
            allowed[t, j] = ahead_ok and back_ok
    out = torch.empty(query_len, n_head, dim, dtype=torch.float64)
    for h in range(n_head):
        kv = h // (n_head // n_kv_head)
        scores = (q[:, h] @ k[:, kv].T) / dim ** 0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, kv]
    return out


def random_qkv(batch, seq_len, n_head, n_kv_head, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, n_head, HEAD_DIM, generator=generator).to(dtype)
    k = torch.randn(batch, seq_len, n_kv_head, HEAD_DIM, generator=generator).to(dtype)
    v = torch.randn(batch, seq_len, n_kv_head, HEAD_DIM, generator=generator).to(dtype)
    return q, k, v


def reference_full(q, k, v, causal=True, window_size=(-1, -1)):
    positions = list(range(q.size(1)))
    return torch.stack([naive_attention(q[b], k[b], v[b], positions, causal, window_size)
                        for b in range(q.size(0))])


def test_backend_is_sdpa_on_cpu():
    assert attention_backend() == "sdpa"


def test_backend_override_is_validated_and_logged(monkeypatch, caplog):
    monkeypatch.setattr(flash_attention, "_backend", None)
    monkeypatch.setenv("NANOCHAT_ATTENTION", "sdpa")
    with caplog.at_level(logging.INFO, logger="nanochat"):
        assert attention_backend() == "sdpa"
        assert attention_backend() == "sdpa"
    backend_lines = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert backend_lines == ["attention backend: sdpa (forced by NANOCHAT_ATTENTION)"]

    monkeypatch.setattr(flash_attention, "_backend", None)
    monkeypatch.setenv("NANOCHAT_ATTENTION", "flash")
    with pytest.raises(ValueError, match="NANOCHAT_ATTENTION='flash' is not one of"):
        attention_backend()

    monkeypatch.setattr(flash_attention, "_backend", None)
    monkeypatch.setenv("NANOCHAT_ATTENTION", "fa3")
    with pytest.raises(RuntimeError, match="fa3: no CUDA GPU"):
        attention_backend()


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("left", [-1, 0, 1, 5, 10, 11, 40])
def test_causal_windows_and_gqa_match_reference(n_head, n_kv_head, left):
    q, k, v = random_qkv(2, 12, n_head, n_kv_head, seed=left + 10 * n_kv_head)
    y = flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
    assert y.shape == q.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference_full(q, k, v, True, (left, 0)),
                               atol=FP32_TOL, rtol=FP32_TOL)


def test_window_changes_the_output():
    # Guards the comparison above: a window that hides keys must give a different answer.
    q, k, v = random_qkv(1, 12, 4, 2)
    assert (flash_attn_func(q, k, v, window_size=(2, 0)) - flash_attn_func(q, k, v)).abs().max() > 1e-2


@pytest.mark.parametrize("window_size", [(-1, -1), (2, 1), (0, 3), (-1, 0)])
def test_non_causal_windows_match_reference(window_size):
    q, k, v = random_qkv(2, 10, 4, 2, seed=3)
    y = flash_attn_func(q, k, v, causal=False, window_size=window_size)
    torch.testing.assert_close(y.double(), reference_full(q, k, v, False, window_size),
                               atol=FP32_TOL, rtol=FP32_TOL)


def test_bf16_inputs_give_bf16_output():
    q, k, v = random_qkv(2, 12, 4, 2, dtype=torch.bfloat16, seed=5)
    y = flash_attn_func(q, k, v, window_size=(3, 0))
    assert y.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa (eps 7.8e-3); outputs are O(1) averages of values.
    torch.testing.assert_close(y.double(), reference_full(q, k, v, True, (3, 0)), atol=3e-2, rtol=3e-2)


def test_gradients_match_reference():
    q, k, v = random_qkv(1, 9, 4, 2, seed=7)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    upstream = torch.randn(1, 9, 4, HEAD_DIM, generator=torch.Generator().manual_seed(8))
    (flash_attn_func(q, k, v, window_size=(3, 0)) * upstream).sum().backward()
    (reference_full(q64, k64, v64, True, (3, 0)) * upstream.double()).sum().backward()
    for ours, reference in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), reference.grad, atol=1e-4, rtol=1e-4)


def test_training_path_compiles_without_graph_breaks():
    attention_backend()  # resolve first, as the module docstring asks for fullgraph=True
    q, k, v = random_qkv(2, 12, 4, 2, seed=9)
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, window_size=(3, 0)),
                             backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v).double(), reference_full(q, k, v, True, (3, 0)),
                               atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("window_size", [(-1, 0), (3, 0)])
def test_prefill_then_decode_equals_full_attention(window_size):
    batch, seq_len, prefill_len, cache_len = 2, 12, 5, 16
    q, k, v = random_qkv(batch, seq_len, 4, 2, seed=11)
    expected = flash_attn_func(q, k, v, causal=True, window_size=window_size)
    torch.testing.assert_close(expected.double(), reference_full(q, k, v, True, window_size),
                               atol=FP32_TOL, rtol=FP32_TOL)

    k_cache = torch.full((batch, cache_len, 2, HEAD_DIM), STALE)
    v_cache = torch.full((batch, cache_len, 2, HEAD_DIM), STALE)
    cache_seqlens = torch.zeros(batch, dtype=torch.int32)
    outputs = [flash_attn_with_kvcache(q[:, :prefill_len], k_cache, v_cache, k[:, :prefill_len],
                                       v[:, :prefill_len], cache_seqlens, window_size=window_size)]
    cache_seqlens += prefill_len
    for t in range(prefill_len, seq_len):
        outputs.append(flash_attn_with_kvcache(q[:, t:t + 1], k_cache, v_cache, k[:, t:t + 1],
                                               v[:, t:t + 1], cache_seqlens, window_size=window_size))
        cache_seqlens += 1
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("query_len", [1, 3])
@pytest.mark.parametrize("causal,window_size", [(True, (-1, 0)), (True, (2, 0)), (False, (-1, -1))])
def test_rows_at_different_positions_match_their_own_reference(query_len, causal, window_size):
    filled = [0, 4, 9]
    batch, cache_len = len(filled), 16
    q, k, v = random_qkv(batch, query_len, 4, 2, seed=query_len)
    generator = torch.Generator().manual_seed(21)
    history_k = torch.randn(batch, cache_len, 2, HEAD_DIM, generator=generator)
    history_v = torch.randn(batch, cache_len, 2, HEAD_DIM, generator=generator)
    k_cache = torch.full_like(history_k, STALE)
    v_cache = torch.full_like(history_v, STALE)
    for b, n in enumerate(filled):
        k_cache[b, :n], v_cache[b, :n] = history_k[b, :n], history_v[b, :n]
    cache_seqlens = torch.tensor(filled, dtype=torch.int32)

    y = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, window_size)

    for b, n in enumerate(filled):
        keys = torch.cat([history_k[b, :n], k[b]])
        values = torch.cat([history_v[b, :n], v[b]])
        expected = naive_attention(q[b], keys, values, [n + t for t in range(query_len)],
                                   causal, window_size)
        torch.testing.assert_close(y[b].double(), expected, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("query_len", [1, 3])
def test_one_row_positions_serves_every_layer_of_a_pass(query_len):
    # A model's layers share one RowPositions per pass (its slots and masks are worked out once);
    # each layer, with its own cache and window, must get what the lengths tensor alone gives.
    filled, cache_len = [2, 7, 0], 16
    lengths = torch.tensor(filled, dtype=torch.int32)
    rows = RowPositions(lengths)
    generator = torch.Generator().manual_seed(61)
    for layer, window_size in enumerate([(3, 0), (-1, 0), (3, 0)]):
        q, k, v = random_qkv(3, query_len, 4, 2, seed=62 + layer)
        k_cache = torch.randn(3, cache_len, 2, HEAD_DIM, generator=generator)
        v_cache = torch.randn(3, cache_len, 2, HEAD_DIM, generator=generator)
        fresh_k, fresh_v = k_cache.clone(), v_cache.clone()
        shared = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rows, True, window_size)
        fresh = flash_attn_with_kvcache(q, fresh_k, fresh_v, k, v, lengths, True, window_size)
        assert torch.equal(shared, fresh)
        assert torch.equal(k_cache, fresh_k) and torch.equal(v_cache, fresh_v)
    assert lengths.tolist() == filled


@pytest.mark.parametrize("query_len", [1, 2])
@pytest.mark.parametrize("contiguous", [True, False])
def test_cache_write_lands_in_its_slots_only(query_len, contiguous):
    # A contiguous cache is written through its flattened positions, any other by (row, slot) indexing.
    filled, cache_len = [0, 5, 2], 10
    q, k, v = random_qkv(3, query_len, 4, 2, seed=31)
    generator = torch.Generator().manual_seed(32)
    k_cache = torch.randn(3, cache_len, 2, 2 * HEAD_DIM, generator=generator)
    v_cache = torch.randn(3, cache_len, 2, 2 * HEAD_DIM, generator=generator)
    k_cache, v_cache = (k_cache[..., :HEAD_DIM], v_cache[..., :HEAD_DIM])
    if contiguous:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    assert k_cache.is_contiguous() == contiguous
    k_before, v_before = k_cache.clone(), v_cache.clone()
    cache_seqlens = torch.tensor(filled, dtype=torch.int32)

    flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens)

    assert cache_seqlens.tolist() == filled and cache_seqlens.dtype == torch.int32
    expected_k, expected_v = k_before.clone(), v_before.clone()
    for b, n in enumerate(filled):
        expected_k[b, n:n + query_len] = k[b]
        expected_v[b, n:n + query_len] = v[b]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_decode_reads_only_the_filled_prefix():
    # NaN is poison even under a mask (0 * NaN = NaN), so a finite answer proves that positions
    # past max(cache_seqlens) + Tq were never read.
    filled, cache_len = [3, 6], 64
    q, k, v = random_qkv(2, 1, 4, 2, seed=41)
    k_cache = torch.full((2, cache_len, 2, HEAD_DIM), float("nan"))
    v_cache = torch.full((2, cache_len, 2, HEAD_DIM), float("nan"))
    generator = torch.Generator().manual_seed(42)
    for b, n in enumerate(filled):
        k_cache[b, :n] = torch.randn(n, 2, HEAD_DIM, generator=generator)
        v_cache[b, :n] = torch.randn(n, 2, HEAD_DIM, generator=generator)
    # Row 0 is shorter than row 1: its unfilled slots 4..6 are inside the read prefix, so give
    # them finite stale values that the mask has to hide.
    k_cache[0, 4:7], v_cache[0, 4:7] = STALE, STALE
    cache_seqlens = torch.tensor(filled, dtype=torch.int32)

    y = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens)

    assert torch.isfinite(y).all()
    for b, n in enumerate(filled):
        expected = naive_attention(q[b], k_cache[b, :n + 1], v_cache[b, :n + 1], [n])
        torch.testing.assert_close(y[b].double(), expected, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("query_len", [1, 3])
def test_without_new_keys_the_cache_already_holds_the_queries(query_len):
    q, k, v = random_qkv(2, query_len, 4, 2, seed=51)
    k_cache = torch.full((2, 8, 2, HEAD_DIM), STALE)
    v_cache = torch.full((2, 8, 2, HEAD_DIM), STALE)
    appended = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, torch.tensor([0, 2], dtype=torch.int32))
    # The same keys are now in the cache; cache_seqlens counts them, as Flash Attention expects.
    reread = flash_attn_with_kvcache(q, k_cache, v_cache,
                                     cache_seqlens=torch.tensor([query_len, 2 + query_len], dtype=torch.int32))
    torch.testing.assert_close(reread, appended, atol=FP32_TOL, rtol=FP32_TOL)


def test_mistakes_raise_clear_errors():
    q, k, v = random_qkv(1, 4, 4, 2)
    k_cache, v_cache = torch.zeros(1, 5, 2, HEAD_DIM), torch.zeros(1, 5, 2, HEAD_DIM)
    seqlens = torch.tensor([2], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        flash_attn_func(q, *random_qkv(1, 4, 4, 3)[1:])
    with pytest.raises(ValueError, match="window_size must be a pair"):
        flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="allocate a longer cache"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, seqlens)
    assert not k_cache.any(), "a rejected call must not write into the cache"
    with pytest.raises(ValueError, match="both k and v"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k, cache_seqlens=seqlens)
    with pytest.raises(ValueError, match="cache_seqlens is required"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v)


@pytest.mark.parametrize("query_len,filled", [(1, 0), (1, 9), (3, 0), (3, 6)])
@pytest.mark.parametrize("causal,window_size", [(True, (-1, 0)), (True, (2, 0)), (False, (-1, -1)),
                                                (False, (2, 1))])
def test_rows_at_one_position_take_the_unmasked_path_with_the_same_result(query_len, filled, causal,
                                                                          window_size):
    # An int cache_seqlens (every row at one position) slices instead of masking; it must agree
    # with the masked path that a (batch,) tensor of the same lengths takes, cache writes included.
    batch, cache_len = 2, 16
    q, k, v = random_qkv(batch, query_len, 4, 2, seed=5)
    generator = torch.Generator().manual_seed(8)
    k_cache = torch.randn(batch, cache_len, 2, HEAD_DIM, generator=generator)
    v_cache = torch.randn(batch, cache_len, 2, HEAD_DIM, generator=generator)
    masked_k, masked_v = k_cache.clone(), v_cache.clone()
    lengths = torch.full((batch,), filled, dtype=torch.int32)

    masked = flash_attn_with_kvcache(q, masked_k, masked_v, k, v, lengths, causal, window_size)
    sliced = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, filled, causal, window_size)

    torch.testing.assert_close(sliced, masked, atol=FP32_TOL, rtol=FP32_TOL)
    assert torch.equal(k_cache, masked_k) and torch.equal(v_cache, masked_v)
    # Without new keys the cache already holds the queries' own.
    lengths += query_len
    torch.testing.assert_close(
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=filled + query_len, causal=causal,
                                window_size=window_size),
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=causal,
                                window_size=window_size), atol=FP32_TOL, rtol=FP32_TOL)


def test_rows_at_one_position_check_their_room():
    q, k, v = random_qkv(1, 2, 2, 2)
    cache = torch.zeros(1, 4, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="holds 4 positions"):
        flash_attn_with_kvcache(q, cache, cache.clone(), k, v, 3)
    with pytest.raises(ValueError, match=">= 0"):
        flash_attn_with_kvcache(q, cache, cache.clone(), k, v, -1)
