"""Tests of the training recipe: the depth-derived horizon and batch size, and the schedules."""

import math

import pytest
import torch

from nanochat.loss_eval import evaluate_bpb, unigram_bpb
from nanochat.training import (best_batch_size, lr_multiplier, muon_momentum, resolve_horizon,
                               weight_decay_at)


def test_horizon_from_ratio_and_grad_accum():
    h = resolve_horizon(scaling_params=1_000_000, flops_per_token=6e6, reference_scaling_params=1_000_000,
                        device_batch_size=4, sequence_len=256, num_workers=2, total_batch_size=4096,
                        target_param_data_ratio=20)
    assert h.grad_accum_steps == 4096 // (4 * 256 * 2) == 2
    assert h.num_iterations == 20 * 1_000_000 // 4096
    assert h.total_tokens == h.num_iterations * 4096
    assert h.lr_batch_scale == pytest.approx(math.sqrt(4096 / 2 ** 19))
    # same size as the reference depth: weight decay scales with sqrt(batch) only
    assert h.weight_decay_scale == pytest.approx(math.sqrt(4096 / 2 ** 19))


def test_weight_decay_scale_follows_batch_and_horizon():
    common = dict(flops_per_token=6e6, device_batch_size=4, sequence_len=256, num_workers=1, total_batch_size=2 ** 19)
    # a model with 1/8 of the reference's parameters plans 1/8 of its tokens: 8x the decay
    small = resolve_horizon(scaling_params=1_000_000, reference_scaling_params=8_000_000, **common)
    assert small.weight_decay_scale == pytest.approx(8.0)
    # the default horizon is 12 tokens per parameter, floored to whole steps
    assert small.num_iterations == 12 * 1_000_000 // 2 ** 19


def test_horizon_precedence_and_errors():
    common = dict(scaling_params=10_000, flops_per_token=1e5, reference_scaling_params=10_000,
                  device_batch_size=2, sequence_len=64, num_workers=1, total_batch_size=256)
    assert resolve_horizon(num_iterations=7, target_flops=1e12, **common).num_iterations == 7
    assert resolve_horizon(target_flops=1e5 * 256 * 30, **common).num_iterations == 30
    with pytest.raises(ValueError, match="not a multiple"):
        resolve_horizon(**{**common, "total_batch_size": 100})


def test_best_batch_size_is_reference_at_reference_and_grows_with_tokens():
    assert best_batch_size(1e9, 1e9) == 2 ** 19
    bigger = best_batch_size(16e9, 1e9)  # 16x the tokens -> 16**0.383 ~ 2.9x the batch
    assert bigger == 2 ** 21
    assert best_batch_size(1e3, 1e9) >= 1


def test_lr_schedule_defaults():
    # base_train's 40 warmup steps, then constant until 65% of the run is left, then down to 5%
    n = 1000
    assert lr_multiplier(0, n, warmup_steps=40) == pytest.approx(1 / 40)
    assert lr_multiplier(39, n, warmup_steps=40) == pytest.approx(1.0)
    assert lr_multiplier(0, n) == 1.0  # no warmup unless asked for
    assert lr_multiplier(350, n) == 1.0 and lr_multiplier(351, n) < 1.0
    assert lr_multiplier(n, n) == pytest.approx(0.05)
    assert lr_multiplier(675, n) == pytest.approx(0.5 + 0.5 * 0.05)
    # a warmup ratio, when given, overrides the warmup steps
    assert lr_multiplier(0, n, warmup_ratio=0.01, warmup_steps=40) == pytest.approx(1 / 10)


def test_lr_schedule_shape():
    n = 100
    values = [lr_multiplier(s, n, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1) for s in range(n + 1)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in values[10:81])
    assert values[90] == pytest.approx(0.5 + 0.5 * 0.1)
    assert values[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[80:], values[81:]))


def test_momentum_and_weight_decay_schedules():
    # 0.85 -> 0.97 over 400 steps; without a run length it stays there
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(200) == pytest.approx(0.91)
    assert muon_momentum(10_000) == pytest.approx(0.97)
    # with one, it falls to 0.90 over the LR warmdown (the last 65% of 2000 steps start at 700)
    assert muon_momentum(600, 2000) == pytest.approx(0.97)
    assert muon_momentum(700, 2000) == pytest.approx(0.97)
    assert muon_momentum(1350, 2000) == pytest.approx(0.935)
    assert muon_momentum(2000, 2000) == pytest.approx(0.90)
    # short runs: the warmdown starts during the warmup, which wins
    assert muon_momentum(100, 200) == pytest.approx(0.88)
    assert muon_momentum(199, 200) == pytest.approx(0.85 + 0.12 * 199 / 400)
    # weight decay: a half cosine to zero
    assert weight_decay_at(0, 10, 0.2) == pytest.approx(0.2)
    assert weight_decay_at(5, 10, 0.2) == pytest.approx(0.1)
    assert weight_decay_at(2, 10, 0.2) == pytest.approx(0.1 * (1 + math.cos(math.pi / 5)))
    assert weight_decay_at(10, 10, 0.2) == pytest.approx(0.0)


class _UniformModel(torch.nn.Module):
    """Predicts a uniform distribution over V tokens: its loss is ln(V) nats per token."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def get_device(self):
        return self.anchor.device

    def forward(self, x, y, loss_reduction="mean"):
        logits = torch.zeros(*y.shape, self.vocab)
        return torch.nn.functional.cross_entropy(logits.view(-1, self.vocab), y.view(-1), ignore_index=-1,
                                                 reduction=loss_reduction)


def test_bits_per_byte_of_a_uniform_model():
    vocab = 16
    token_bytes = torch.full((vocab,), 2, dtype=torch.int32)
    token_bytes[0] = 0  # a special token: not counted
    y = torch.tensor([[1, 2, 0, -1, 3]])
    batches = [(torch.zeros_like(y), y)] * 3
    bpb = evaluate_bpb(_UniformModel(vocab), batches, num_steps=3, token_bytes=token_bytes)
    # every counted token costs ln(16) nats = 4 bits for 2 bytes -> 2 bits per byte
    assert bpb == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no bytes"):
        evaluate_bpb(_UniformModel(vocab), [(y, torch.full_like(y, -1))], num_steps=1, token_bytes=token_bytes)


def test_unigram_bits_per_byte():
    token_bytes = torch.tensor([0, 1, 2, 3], dtype=torch.int32)  # token 0 is special
    # tokens 1 and 2 each half of the counted targets: 1 bit per token over (1 + 2) / 2 bytes
    targets = torch.tensor([[0, 1, 2, -1], [2, 1, 0, 0]])
    assert unigram_bpb(targets, token_bytes) == pytest.approx(4 / 6)
    # a single repeated token costs nothing: it is certain
    assert unigram_bpb(torch.tensor([3, 3, 3]), token_bytes) == 0.0
    with pytest.raises(ValueError, match="no bytes"):
        unigram_bpb(torch.tensor([0, -1]), token_bytes)
