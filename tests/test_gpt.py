"""Tests of the GPT model: shapes, parameter groups, initial loss, soft-capping, meta-device init,
the KV-cache forward against the plain forward, and the config dial."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import TRANSPOSED_ROWS_NARROWING, TRANSPOSED_ROWS_WIDENING, GPT, GPTConfig, Linear, config_from_depth, has_value_embedding
from nanochat.kv_cache import KVCache

TINY = GPTConfig(sequence_len=32, vocab_size=250, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL")


def build(config=TINY, seed=0, device="cpu"):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model.eval()


def test_shapes_padding_and_param_groups():
    model = build()
    assert model.padded_vocab_size == 256
    idx = torch.randint(0, TINY.vocab_size, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, TINY.vocab_size) and logits.dtype == torch.float32
    counts = model.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["wte"] == 256 * 64 and counts["lm_head"] == 256 * 64
    # one value embedding (layer 1 of 2, the last), kv dim = 1 head * 32
    assert counts["value_embeds"] == 256 * 32

    optimizer = model.setup_optimizer()
    seen = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(seen) == len(list(model.parameters())) == len({id(p) for p in seen})
    for group in optimizer.param_groups:
        if group["kind"] == "muon":
            assert all(p.ndim == 2 for p in group["params"])
    muon_ids = {id(p) for g in optimizer.param_groups if g["kind"] == "muon" for p in g["params"]}
    assert id(model.lm_head.weight) not in muon_ids and id(model.transformer.wte.weight) not in muon_ids
    assert {id(p) for p in model.transformer.h.parameters()} == muon_ids


def test_initial_loss_is_close_to_uniform():
    model = build()
    idx = torch.randint(0, TINY.vocab_size, (4, 32))
    loss = model(idx, targets=torch.roll(idx, -1, dims=1))
    # lm_head starts at std 0.001 so the logits are ~1e-2 and the softmax is nearly uniform
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.02


def test_ignore_index_and_reduction():
    model = build()
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -1
    per_token = model(idx, targets=targets, loss_reduction="none").view(2, 8)
    assert torch.all(per_token[:, :4] == 0)
    mean = model(idx, targets=targets)
    assert torch.allclose(mean, per_token[:, 4:].mean())


def test_logits_are_soft_capped():
    model = build()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
    logits = model(torch.randint(0, TINY.vocab_size, (2, 16)))
    assert logits.abs().max().item() <= 15.0
    assert logits.abs().max().item() > 14.0  # the cap is actually reached, not just small logits


def test_meta_init_is_deterministic():
    a, b, c = build(seed=1), build(seed=1), build(seed=2)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    assert torch.equal(a.rotary_cos, c.rotary_cos)


def _trained_looking(model):
    """Zero-initialised projections make blocks the identity at init, which would hide attention
    bugs; randomise every parameter so each layer (and its window) matters."""
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def test_kv_cache_prefill_and_decode_match_plain_forward():
    config = GPTConfig(sequence_len=16, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                       window_pattern="SSL")  # S = 4 tokens: the window matters at T = 14
    model = _trained_looking(build(config))
    idx = torch.randint(0, config.vocab_size, (1, 14))
    full = model(idx)

    cache = KVCache.for_model(model, batch_size=1, max_seq_len=16)
    prefill = model(idx[:, :6], kv_cache=cache)
    torch.testing.assert_close(prefill, full[:, :6], rtol=1e-4, atol=1e-4)
    for t in range(6, 14):
        step = model(idx[:, t:t + 1], kv_cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
    assert cache.get_pos() == 14


def _two_rows(second_len: int):
    """A trained-looking 2-layer model of context 16, a 9-token and a `second_len`-token
    sequence, and an empty cache of two rows for them."""
    config = GPTConfig(sequence_len=16, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                       window_pattern="SL")
    model = _trained_looking(build(config))
    a = torch.randint(0, 100, (1, 9))
    b = torch.randint(0, 100, (1, second_len))
    return model, a, b, KVCache.for_model(model, batch_size=2, max_seq_len=16)


def test_kv_cache_rows_at_different_positions():
    model, a, b, cache = _two_rows(5)
    # prefill each row on its own cache, then copy rows into one batch cache at different positions
    for row, seq in enumerate((a, b)):
        solo = KVCache.for_model(model, batch_size=1, max_seq_len=16)
        model(seq[:, :-1], kv_cache=solo)
        n = seq.size(1) - 1
        cache.k[:, row, :n] = solo.k[:, 0, :n]
        cache.v[:, row, :n] = solo.v[:, 0, :n]
        cache.cache_seqlens[row] = n
        cache.prev_embedding[row] = solo.prev_embedding[0]  # what the smear of the next token reads
    step = model(torch.cat([a[:, -1:], b[:, -1:]]), kv_cache=cache)
    torch.testing.assert_close(step[0, 0], model(a)[0, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step[1, 0], model(b)[0, -1], rtol=1e-4, atol=1e-4)
    assert cache.cache_seqlens.tolist() == [9, 5]


def test_rows_at_one_position_match_rows_at_mixed_positions():
    # The same-position fast path (rotary slice, unmasked attention) against the gathered, masked
    # path: a batch of two rows at one position, then the same rows beside a third, shorter one.
    config = GPTConfig(sequence_len=16, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                       window_pattern="SSL")
    model = _trained_looking(build(config))
    torch.manual_seed(1)
    prompts = torch.randint(0, 100, (3, 10))
    prompts[2, :3] = prompts[0, :3]
    together = KVCache.for_model(model, batch_size=2, max_seq_len=16)
    mixed = KVCache.for_model(model, batch_size=3, max_seq_len=16)
    model(prompts[:2, :9], kv_cache=together)
    model(prompts[:2, :9], kv_cache=mixed.rows(0, 2))
    model(prompts[2:, :4], kv_cache=mixed.rows(2, 3))
    same = model(prompts[:2, 9:], kv_cache=together)
    different = model(prompts[:, 9:], kv_cache=mixed)
    torch.testing.assert_close(same, different[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(same[:, 0], model(prompts[:2])[:, -1], rtol=1e-4, atol=1e-4)


def test_rows_of_different_lengths_padded_into_one_pass_equal_their_own_passes():
    # The scheduler prefills the prompts admitted in one step together, each padded at its end to
    # the longest; two rows continue a cached prefix (the smear reads its carried embedding), one
    # starts empty. Each row must get the logits, keys and values, length and carried embedding
    # that its own unpadded pass gives, with windows, GQA and value embeddings.
    config = GPTConfig(sequence_len=32, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                       window_pattern="SSL")
    model = _trained_looking(build(config))
    torch.manual_seed(2)
    prefixes, tails = [6, 0, 3], [[5, 9, 2], [7, 1, 4, 4, 8, 3, 2], [11]]
    history = torch.randint(0, 100, (3, 6))
    together = KVCache.for_model(model, batch_size=3, max_seq_len=16)
    alone = [KVCache.for_model(model, batch_size=1, max_seq_len=16) for _ in tails]
    for row, filled in enumerate(prefixes):
        if filled:
            model(history[row:row + 1, :filled], kv_cache=alone[row])
            model(history[row:row + 1, :filled], kv_cache=together.rows(row, row + 1))
    longest = max(map(len, tails))
    padded = torch.tensor([tail + [99] * (longest - len(tail)) for tail in tails])

    logits = model(padded, kv_cache=together, row_lengths=[len(tail) for tail in tails])

    assert logits.shape == (3, 1, 100)
    assert together.cache_seqlens.tolist() == [filled + len(tail) for filled, tail in zip(prefixes, tails)]
    for row, (filled, tail) in enumerate(zip(prefixes, tails)):
        expected = model(torch.tensor([tail]), kv_cache=alone[row], last_only=True)
        torch.testing.assert_close(logits[row], expected[0], rtol=1e-4, atol=1e-4)
        length = filled + len(tail)
        torch.testing.assert_close(together.k[:, row, :length], alone[row].k[:, 0, :length], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.v[:, row, :length], alone[row].v[:, 0, :length], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.prev_embedding[row], alone[row].prev_embedding[0])
    with pytest.raises(ValueError, match="one length in 1..7 per row"):
        model(padded, kv_cache=together, row_lengths=[1, 8, 2])
    with pytest.raises(ValueError, match="needs a kv_cache"):
        model(padded, row_lengths=[3, 7, 1])


def test_last_only_gives_the_last_position_of_the_full_logits():
    model = _trained_looking(build())
    idx = torch.randint(0, TINY.vocab_size, (2, 7))
    full = model(idx)
    torch.testing.assert_close(model(idx, last_only=True), full[:, -1:])
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=8)
    torch.testing.assert_close(model(idx, kv_cache=cache, last_only=True), full[:, -1:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, targets=idx, last_only=True)


def test_window_pattern_and_value_embedding_layers():
    config = GPTConfig(sequence_len=32, vocab_size=64, n_layer=6, n_head=2, n_kv_head=2, n_embd=64,
                       window_pattern="SSSL")
    model = GPT(config)
    assert model.window_sizes == [(8, 0), (8, 0), (8, 0), (-1, 0), (8, 0), (-1, 0)]
    assert [has_value_embedding(i, 6) for i in range(6)] == [False, True, False, True, False, True]
    assert sorted(model.value_embeds.keys()) == ["1", "3", "5"]
    assert GPT(GPTConfig(n_layer=3, n_head=2, n_kv_head=2, n_embd=64, window_pattern="S")).window_sizes[-1] == (-1, 0)


def test_config_from_depth_and_validation():
    cfg = config_from_depth(20)
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer) == (1280, 10, 20)
    tiny = config_from_depth(2, aspect_ratio=32, head_dim=32)
    assert (tiny.n_embd, tiny.n_head) == (64, 2)
    assert config_from_depth(3, aspect_ratio=64, head_dim=128).n_embd == 256  # 192 rounded up
    # short windows as nanochat sizes them: a quarter of the context, rounded up to 128
    with torch.device("meta"):
        assert GPT(config_from_depth(4, head_dim=64, sequence_len=256)).window_sizes == [(128, 0)] * 3 + [(-1, 0)]
        assert GPT(config_from_depth(4, sequence_len=2048)).window_sizes[0] == (512, 0)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4, n_embd=768)
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(window_pattern="SXL")
    with pytest.raises(ValueError, match="depth"):
        config_from_depth(0)


def test_estimate_flops_counts_matmuls_and_attention():
    config = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                       window_pattern="SL")
    model = GPT(config)
    matmul_params = 2 * (4 * 64 * 64 + 2 * 64 * 256) + 2 * 12 + 64 * 64  # blocks (+ one ve_gate) + lm_head
    assert model.num_scaling_params() == matmul_params
    attention = 12 * 2 * 32 * (9 + 32)  # layer 0 sees 8 + 1 keys, layer 1 the full 32
    assert model.estimate_flops() == 6 * matmul_params + attention


def test_one_training_step_lowers_loss_on_a_fixed_batch():
    model = build().train()
    optimizer = model.setup_optimizer()
    idx = torch.randint(0, TINY.vocab_size, (4, 32))
    losses = []
    for _ in range(10):
        loss = model(idx, targets=torch.roll(idx, -1, dims=1))
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_smear_in_a_fresh_row_ignores_the_embedding_its_row_last_held():
    # A reused cache row starts at position 0 with the previous sequence's last embedding still in
    # it; beside a row that continues, the fresh row must see no previous token at all.
    model, a, b, cache = _two_rows(1)
    model(a[:, :-1], kv_cache=cache.rows(0, 1))
    cache.prev_embedding[1] = 100.0
    step = model(torch.cat([a[:, -1:], b]), kv_cache=cache)
    torch.testing.assert_close(step[0, 0], model(a)[0, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step[1, 0], model(b)[0, -1], rtol=1e-4, atol=1e-4)


def test_smear_and_backout_are_config_flags_with_their_own_optimizer_group():
    model = _trained_looking(build())
    optimizer = model.setup_optimizer()
    smear_group = [g for g in optimizer.param_groups if g["lr"] == 0.2 and g["kind"] == "adamw"]
    assert [p.shape for p in smear_group[0]["params"]] == [(1, 24), (1,), (1,)]
    assert smear_group[0]["betas"] == (0.8, 0.95) and smear_group[0]["weight_decay"] == 0.0
    idx = torch.randint(0, TINY.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(idx)
        model.smear_lambda.zero_()
        without_smear = model(idx)
        model.backout_lambda.zero_()
        without_either = model(idx)
    assert not torch.allclose(full[:, 1:], without_smear[:, 1:]) and not torch.allclose(without_smear, without_either)
    torch.testing.assert_close(full[:, 0], without_smear[:, 0])  # the first position has no previous token
    plain = build(GPTConfig(**{**TINY.__dict__, "smear": False, "backout": False}))
    assert not {"smear_gate.weight", "smear_lambda", "backout_lambda"} & set(plain.state_dict())
    assert not any(g["lr"] == 0.2 and g["kind"] == "adamw" for g in plain.setup_optimizer().param_groups)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_training_loss_matches_the_logits_path_in_float64(monkeypatch, reduction):
    """The training loss (lm_head, soft-cap and cross-entropy over chunks of rows, gradients from
    the forward pass: nanochat.lm_loss) and its gradients against the whole model in float64, with
    the logits, soft-cap and cross-entropy in float64 too."""
    from nanochat import lm_loss

    model = _trained_looking(build())
    idx = torch.randint(0, TINY.vocab_size, (3, 32))
    targets = torch.roll(idx, -1, dims=1)
    targets[0, :5] = -1
    targets[2, -1] = -1
    monkeypatch.setitem(lm_loss.CHUNK_BYTES, "cpu", 4 * TINY.vocab_size * 10)  # 10 rows a chunk: 10 chunks
    model.train()
    loss = model(idx, targets=targets, loss_reduction=reduction)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    reference = build().double()
    reference.load_state_dict(model.state_dict())
    monkeypatch.setattr("nanochat.gpt.COMPUTE_DTYPE", torch.float64)
    final_hidden = []
    reference.lm_head.register_forward_hook(lambda module, inputs, output: final_hidden.append(inputs[0]))
    reference(idx)  # the logits path, whose own logits the model returns in fp32
    logits = final_hidden[0] @ reference.lm_head.weight[:TINY.vocab_size].t()
    capped = 15.0 * torch.tanh(logits / 15.0)
    expected = F.cross_entropy(capped.view(-1, TINY.vocab_size), targets.view(-1), ignore_index=-1, reduction=reduction)
    expected_grads = torch.autograd.grad(expected, list(reference.parameters()))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    # fp32 rounding, against the scale of the gradients (backout's is 0 here: the last layer's
    # residual is backed out, and the final norm undoes a scale)
    atol = 1e-5 * max(g.abs().max().item() for g in expected_grads)
    for (name, _), grad, expected_grad in zip(model.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=atol, msg=name)
    with torch.no_grad():  # evaluation computes the loss alone, the same
        torch.testing.assert_close(model(idx, targets=targets, loss_reduction=reduction), loss)


def test_transposed_weights_give_the_same_outputs_and_leave_gradients_alone():
    model = build()
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    # 6 rows: inside every layer's transposed_rows, where the copies are used.
    idx = torch.randint(0, TINY.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, TINY.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for linear in linears:  # the init zeroes the output projections: make every matmul count
            linear.weight.normal_(0.0, 0.1)
        plain_logits = model(idx)
    model(idx, targets).backward()
    plain_grads = [linear.weight.grad.clone() for linear in linears]
    model.zero_grad()

    with model.transposed_weights(max_rows=6):
        assert all(linear.weight_t is not None and linear.weight_t.is_contiguous()
                   and torch.equal(linear.weight_t, linear.weight.t()) for linear in linears)
        with torch.no_grad():
            torch.testing.assert_close(model(idx), plain_logits, atol=1e-5, rtol=1e-5)
            # The copies are what the layers multiply by (here 6 rows), not the weights.
            model.lm_head.weight_t.mul_(2.0)
            assert not torch.allclose(model(idx), plain_logits, atol=1e-3)
            model.lm_head.weight_t.div_(2.0)
            # Past transposed_rows (a prefill) the layers use the weights themselves.
            many_rows = torch.randint(0, TINY.vocab_size, (3, 7), generator=torch.Generator().manual_seed(3))
            model.lm_head.weight_t.mul_(2.0)
            expected = model(many_rows)
            model.lm_head.weight_t.div_(2.0)
            torch.testing.assert_close(model(many_rows), expected)
        # With gradients wanted the layers multiply by the weights themselves, so they get their gradients.
        model(idx, targets).backward()
        for linear, expected in zip(linears, plain_grads):
            torch.testing.assert_close(linear.weight.grad, expected, atol=1e-6, rtol=1e-5)
        outer_copies = [linear.weight_t for linear in linears]
        with model.transposed_weights(max_rows=6):
            pass
        assert all(linear.weight_t is copy for linear, copy in zip(linears, outer_copies))  # nested use keeps them
    assert all(linear.weight_t is None for linear in linears)
    with model.transposed_weights(max_rows=0):
        assert all(linear.weight_t is None for linear in linears)


def test_single_row_passes_use_transposed_copies_of_the_layers_that_widen_only():
    model = build()
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    widening = [linear for linear in linears if linear.out_features >= linear.in_features]
    narrowing = [linear for linear in linears if linear.out_features < linear.in_features]
    assert model.lm_head in widening and model.transformer.h[0].mlp.c_proj in narrowing
    assert all(linear.transposed_rows == TRANSPOSED_ROWS_WIDENING for linear in widening)
    assert all(linear.transposed_rows == TRANSPOSED_ROWS_NARROWING for linear in narrowing)
    assert TRANSPOSED_ROWS_WIDENING[0] == 1 < TRANSPOSED_ROWS_NARROWING[0]
    idx = torch.randint(0, TINY.vocab_size, (1, 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for linear in linears:
            linear.weight.normal_(0.0, 0.1)
        plain_logits = model(idx)
        # A generation of one row copies only the layers that use the copies at one row.
        with model.transposed_weights(max_rows=1):
            assert all(linear.weight_t is not None for linear in widening)
            assert all(linear.weight_t is None for linear in narrowing)
            torch.testing.assert_close(model(idx), plain_logits, atol=1e-5, rtol=1e-5)
            model.lm_head.weight_t.mul_(2.0)  # the head multiplies by its copy at one row
            assert not torch.allclose(model(idx), plain_logits, atol=1e-3)
        with model.transposed_weights(max_rows=TRANSPOSED_ROWS_NARROWING[0]):
            assert all(linear.weight_t is not None for linear in linears)
            # One row through a narrowing layer multiplies by its weight, not by the copy.
            mlp_out = model.transformer.h[0].mlp.c_proj
            mlp_out.weight_t.mul_(2.0)
            torch.testing.assert_close(model(idx), plain_logits, atol=1e-5, rtol=1e-5)
