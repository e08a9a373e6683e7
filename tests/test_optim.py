"""Tests of nanochat.optim: the Polar Express orthogonalization, the exact values of the Muon and
AdamW rules, that a tiny model actually learns, that the distributed optimizer on two gloo
processes matches the single-process one (checkpoint round trip included), and that bad groups
are rejected."""

import io
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from nanochat.optim import (POLAR_EXPRESS_COEFFS, DistMuonAdamW, MuonAdamW, equilibrate_rows,
                            orthogonalize)


def _polar_express_scalar_map(s: torch.Tensor, steps: int) -> torch.Tensor:
    """What the iteration does to one singular value of the normalized matrix."""
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_polar_express_is_close_to_orthogonal(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = orthogonalize(g, steps=5)
    assert out.shape == g.shape and out.dtype == g.dtype
    s_out = torch.linalg.svdvals(out.double())
    # Why [0.8, 1.2]: divided by 1.01 x its Frobenius norm (about sqrt(64 * 32) = 45), a Gaussian
    # 64x32 matrix has singular values from about (8 - 5.7) / 45 = 0.05 to (8 + 5.7) / 45 = 0.3.
    # The five quintics send every start value in [0.001, 1] / 1.01 into [0.85, 1.15] (checked
    # numerically on a fine grid). [0.8, 1.2] holds with margin, while a broken iteration (no
    # normalization, wrong orientation, coefficients out of order, too few steps) falls outside it.
    assert s_out.min() > 0.8 and s_out.max() < 1.2
    assert 0.9 < s_out.mean().item() < 1.1
    # Sharper: the iteration acts on each normalized singular value by the scalar map.
    s_in = torch.linalg.svdvals(g.double())
    expected = _polar_express_scalar_map(s_in / (1.01 * torch.linalg.norm(g.double())), steps=5)
    # The map is not monotone, so compare sorted values (svdvals sorts descending).
    torch.testing.assert_close(s_out, expected.sort(descending=True).values, atol=2e-4, rtol=0)
    # And the singular vectors are kept: out = U f(S) V^T.
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    torch.testing.assert_close(u.mT @ out.double() @ vh.mT, torch.diag(expected), atol=2e-4, rtol=0)


def test_polar_express_batched_matches_one_by_one_and_transpose():
    g = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(1))
    batched = orthogonalize(g)
    for i in range(3):
        torch.testing.assert_close(batched[i], orthogonalize(g[i]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(orthogonalize(g[i].mT), batched[i].mT, atol=1e-5, rtol=1e-5)


def test_row_equilibration_evens_rows_and_keeps_the_norm():
    g = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(7)) * torch.arange(1.0, 7.0)[:, None]
    out = equilibrate_rows(g)
    row_norms = out.norm(dim=-1)
    torch.testing.assert_close(row_norms, row_norms[:, :1].expand_as(row_norms))
    torch.testing.assert_close(out.norm(dim=(-2, -1)), g.norm(dim=(-2, -1)))
    # each row keeps its direction
    torch.testing.assert_close(out / row_norms[..., None], g / g.norm(dim=-1, keepdim=True))


def _expected_first_muon_update(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first Muon update written out, and the mean squares NorMuon averages: the Nesterov
    step is (1 - m^2) * G and every stage is scale-free, so it is the orthogonalized,
    row-equilibrated G with the norm of a semi-orthogonal matrix; NorMuon's first running mean is
    (1 - beta2) x the rows' (a wide matrix: columns') mean square, so each row (column) is divided
    by its RMS, then the whole is rescaled to that norm."""
    rows, cols = g.shape
    u = orthogonalize(equilibrate_rows(g))
    u = u * (min(rows, cols) ** 0.5 / u.norm())
    mean_square = u.square().mean(dim=1 if rows >= cols else 0, keepdim=True)
    v = u / mean_square.sqrt()
    return v * (u.norm() / v.norm()), mean_square


def test_first_step_values_of_muon_and_adamw():
    gen = torch.Generator().manual_seed(2)
    wide = nn.Parameter(torch.randn(4, 8, generator=gen))
    tall = nn.Parameter(torch.randn(12, 3, generator=gen))
    emb = nn.Parameter(torch.randn(5, 4, generator=gen))
    start = [t.detach().clone() for t in (wide, tall, emb)]
    grads = [torch.randn(t.shape, generator=gen) for t in (wide, tall, emb)]
    for p, g in zip((wide, tall, emb), grads):
        p.grad = g.clone()
    opt = MuonAdamW([
        {"kind": "muon", "params": [wide, tall], "lr": 0.02, "weight_decay": 0.5},
        {"kind": "adamw", "params": [emb], "lr": 0.01, "weight_decay": 0.1},
    ])
    opt.step()
    # The tall 12x3 matrix gets the sqrt(rows / cols) = 2 factor on its step and its decay, the
    # wide one 1. The decay is cautious: only entries whose update has the weight's sign decay.
    for p, p0, g, factor in [(wide, start[0], grads[0], 1.0), (tall, start[1], grads[1], 2.0)]:
        update, _ = _expected_first_muon_update(g)
        decays = (update * p0) >= 0
        assert 0 < decays.sum() < decays.numel()  # both kinds of entries are exercised
        expected = p0 - 0.02 * factor * (update + 0.5 * p0 * decays)
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(opt.state[wide]["second_momentum_buffer"],
                               0.1 * _expected_first_muon_update(grads[0])[1], atol=1e-6, rtol=1e-4)
    assert opt.state[wide]["second_momentum_buffer"].shape == (1, 8)
    assert opt.state[tall]["second_momentum_buffer"].shape == (12, 1)
    # Adam's bias-corrected first step is g / |g| = sign(g), whatever the betas.
    expected = start[2] * (1 - 0.01 * 0.1) - 0.01 * grads[2].sign()
    torch.testing.assert_close(emb.detach(), expected, atol=1e-6, rtol=1e-6)
    assert [g["initial_lr"] for g in opt.param_groups] == [0.02, 0.01]
    assert opt.param_groups[1]["betas"] == (0.8, 0.95) and opt.param_groups[1]["eps"] == 1e-10
    assert opt.param_groups[0]["ns_steps"] == 5 and opt.param_groups[0]["momentum"] == 0.95
    assert opt.param_groups[0]["beta2"] == 0.9


def test_adamw_groups_match_torch_adamw_over_many_steps():
    gen = torch.Generator().manual_seed(5)
    ours, theirs = nn.Parameter(torch.randn(6, 5, generator=gen)), nn.Parameter(torch.empty(6, 5))
    theirs.data.copy_(ours.data)
    opt = MuonAdamW([{"kind": "adamw", "params": [ours], "lr": 0.01, "betas": (0.9, 0.99),
                      "eps": 1e-8, "weight_decay": 0.3}])
    reference = torch.optim.AdamW([theirs], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.3)
    for _ in range(10):
        grad = torch.randn(6, 5, generator=gen)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        reference.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-6, rtol=1e-6)
    assert opt.state[ours]["step"] == 10


def test_schedule_written_into_groups_is_used():
    """The trainer sets lr / momentum / weight_decay per step; lr 0 and wd 0 must freeze a matrix."""
    p = nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(6)))
    opt = MuonAdamW([{"kind": "muon", "params": [p], "lr": 0.1, "weight_decay": 0.5}])
    before = p.detach().clone()
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.ones(4, 4)
    opt.step()
    assert torch.equal(p.detach(), before)
    assert opt.param_groups[0]["initial_lr"] == 0.1
    # The momentum buffer still moved to m * buf + (1 - m) * g with the group's current momentum.
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.full((4, 4), 0.05))
    opt.param_groups[0]["momentum"] = 0.5
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.full((4, 4), 0.525))


class TinyLM(nn.Module):
    """embedding -> two linear layers (an MLP with a residual) -> lm head."""

    def __init__(self, vocab: int = 32, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc_in = nn.Linear(dim, 4 * dim, bias=False)
        self.fc_out = nn.Linear(4 * dim, dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.fc_out(F.relu(self.fc_in(x)))
        return self.lm_head(x)


def test_tiny_model_loss_falls():
    torch.manual_seed(3)
    model = TinyLM()
    tokens = torch.randint(0, 32, (8, 16))
    targets = (tokens * 7 + 3) % 32  # a learnable token-to-token mapping
    opt = MuonAdamW([
        {"kind": "muon", "params": [model.fc_in.weight, model.fc_out.weight], "lr": 0.02},
        {"kind": "adamw", "params": [model.embed.weight], "lr": 0.05},
        {"kind": "adamw", "params": [model.lm_head.weight], "lr": 0.01},
    ])
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 3.0  # about ln(32) = 3.47 at init
    # One step already lowers it (measured: 3.62 to 3.36): an optimizer whose first update is
    # lost (zero, or skipped while its state is created) is caught here, not only 20 steps later.
    assert losses[1] < losses[0] - 0.1, losses
    assert losses[-1] < 0.5 * losses[0], losses


def test_optimizer_skips_parameters_without_gradients():
    used, unused = nn.Parameter(torch.ones(4, 4)), nn.Parameter(torch.ones(4, 4))
    used.grad = torch.randn(4, 4)
    MuonAdamW([{"kind": "muon", "params": [used, unused], "lr": 0.1}]).step()
    assert not torch.equal(used.detach(), torch.ones(4, 4))
    assert torch.equal(unused.detach(), torch.ones(4, 4))


# --- distributed: two gloo processes against the single-process optimizer ---

WORLD = 2
STEPS = 4
STEPS_AFTER_RESUME = 2


def _make_params() -> dict[str, torch.Tensor]:
    """Three 8x16 matrices (odd count: rank 0 owns two), two tall 12x4 ones, a lone 5x7 one (rank 1
    owns none of its bucket), an embedding whose dim 0 (6) splits over two ranks, and a 3-vector
    that does not."""
    gen = torch.Generator().manual_seed(4)
    shapes = {"m0": (8, 16), "m1": (8, 16), "t0": (12, 4), "m2": (8, 16), "t1": (12, 4),
              "solo": (5, 7), "emb": (6, 4), "scalars": (3,)}
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def _make_optimizer(cls, params: dict[str, nn.Parameter]):
    return cls([
        {"kind": "muon", "params": [params[n] for n in ("m0", "m1", "t0", "m2", "t1", "solo")],
         "lr": 0.05, "weight_decay": 0.1},
        {"kind": "adamw", "params": [params["emb"]], "lr": 0.02, "weight_decay": 0.05},
        {"kind": "adamw", "params": [params["scalars"]], "lr": 0.03, "betas": (0.9, 0.99)},
    ])


def _apply_schedule(opt, step: int) -> None:
    """What the trainer does each step: lr decay, muon momentum warmup, weight decay decay."""
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * (1.0 - 0.1 * step)
        if group["kind"] == "muon":
            group["momentum"] = 0.85 + 0.02 * step
            group["weight_decay"] = 0.1 * (1.0 - 0.1 * step)


def _rank_grads(step: int, rank: int, params: dict) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return {name: torch.randn(p.shape, generator=gen) for name, p in params.items()}


def _step(opt, params: dict, step: int, rank: int) -> None:
    _apply_schedule(opt, step)
    for name, grad in _rank_grads(step, rank, params).items():
        params[name].grad = grad
    opt.step()


def _loopback_interface() -> str:
    return next(name for _, name in socket.if_nameindex() if name.startswith("lo"))


def _dist_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()  # keep gloo's own sockets on loopback
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        params = {n: nn.Parameter(t) for n, t in _make_params().items()}
        opt = _make_optimizer(DistMuonAdamW, params)
        for step in range(STEPS):
            _step(opt, params, step, rank)
        # Checkpoint round trip through bytes, as a real checkpoint would do it.
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        saved = torch.load(io.BytesIO(buffer.getvalue()))
        resumed_params = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
        resumed_opt = _make_optimizer(DistMuonAdamW, resumed_params)
        resumed_opt.load_state_dict(saved)
        for step in range(STEPS, STEPS + STEPS_AFTER_RESUME):
            _step(opt, params, step, rank)
            _step(resumed_opt, resumed_params, step, rank)
        torch.save({"params": {n: p.detach() for n, p in params.items()},
                    "resumed": {n: p.detach() for n, p in resumed_params.items()},
                    "world_size": saved["world_size"],
                    "state_shapes": {i: {k: tuple(v.shape) for k, v in s.items() if torch.is_tensor(v)}
                                     for i, s in saved["state"].items()}},
                   f"{out_dir}/rank{rank}.pt")
        # Neither rank tears its connections down while the other may still be using them.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization: about one run in fifty on a loaded machine, torch's
    # gloo teardown aborts a process there ("terminate called without an active exception"),
    # after every result is already on disk. Errors above still propagate to mp.spawn.
    os._exit(0)


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_matches_single_process_and_resumes(tmp_path):
    mp.spawn(_dist_worker, args=(_free_loopback_port(), str(tmp_path)), nprocs=WORLD, join=True)

    params = {n: nn.Parameter(t) for n, t in _make_params().items()}
    opt = _make_optimizer(MuonAdamW, params)
    for step in range(STEPS + STEPS_AFTER_RESUME):
        _apply_schedule(opt, step)
        per_rank = [_rank_grads(step, rank, params) for rank in range(WORLD)]
        for name, p in params.items():
            p.grad = sum(g[name] for g in per_rank) / WORLD
        opt.step()

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, p in params.items():
        assert not torch.allclose(p.detach(), _make_params()[name])  # every parameter moved
        for result in results:
            torch.testing.assert_close(result["params"][name], p.detach(), atol=1e-5, rtol=1e-5)
            # The resumed optimizer continues exactly like the one that never stopped.
            assert torch.equal(result["resumed"][name], result["params"][name]), name

    # State is sharded. State indices follow the order of params in the groups:
    # 0 m0, 1 m1, 2 t0, 3 m2, 4 t1, 5 solo, 6 emb, 7 scalars. The 8x16 bucket [m0, m1, m2] is
    # split [m0, m1] | [m2], the 12x4 bucket [t0, t1] is split [t0] | [t1], the 5x7 bucket
    # [solo] | []; emb rows are split 3 | 3, and the 3-vector is replicated.
    rank0, rank1 = (r["state_shapes"] for r in results)
    assert set(rank0) == {0, 1, 2, 5, 6, 7} and set(rank1) == {3, 4, 6, 7}
    assert rank0[0]["momentum_buffer"] == (8, 16) and rank1[4]["momentum_buffer"] == (12, 4)
    assert rank0[5]["momentum_buffer"] == (5, 7)
    assert rank0[6]["exp_avg"] == rank1[6]["exp_avg"] == (3, 4)
    assert rank0[7]["exp_avg_sq"] == rank1[7]["exp_avg_sq"] == (3,)
    assert results[0]["world_size"] == results[1]["world_size"] == WORLD


def test_distributed_without_process_group_is_muon_adamw():
    params = {n: nn.Parameter(t) for n, t in _make_params().items()}
    reference_params = {n: nn.Parameter(t) for n, t in _make_params().items()}
    opt = _make_optimizer(DistMuonAdamW, params)
    reference = _make_optimizer(MuonAdamW, reference_params)
    for step in range(3):
        _step(opt, params, step, rank=0)
        _step(reference, reference_params, step, rank=0)
    for name in params:
        assert torch.equal(params[name].detach(), reference_params[name].detach()), name
    state = opt.state_dict()
    assert state["world_size"] == 1
    state["world_size"] = 2
    with pytest.raises(ValueError, match="world size 2.*current world size is 1"):
        opt.load_state_dict(state)


# --- bad input ---

def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind='sgd'.*'muon'.*'adamw'"):
        MuonAdamW([{"kind": "sgd", "params": [nn.Parameter(torch.ones(2, 2))], "lr": 0.1}])
    with pytest.raises(ValueError, match="kind=None"):
        MuonAdamW([{"params": [nn.Parameter(torch.ones(2, 2))], "lr": 0.1}])


def test_non_matrix_in_muon_group_is_rejected():
    matrix, vector = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(3,\).*'adamw'"):
        MuonAdamW([{"kind": "muon", "params": [matrix, vector], "lr": 0.1}])


def test_misspelled_key_missing_lr_and_bad_values_are_rejected():
    p = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"unknown keys \['weight_deacy'\]"):
        MuonAdamW([{"kind": "adamw", "params": [p], "lr": 0.1, "weight_deacy": 0.1}])
    with pytest.raises(ValueError, match="no 'lr'"):
        MuonAdamW([{"kind": "muon", "params": [p]}])
    with pytest.raises(ValueError, match="momentum"):
        MuonAdamW([{"kind": "muon", "params": [p], "lr": 0.1, "momentum": 1.5}])
    with pytest.raises(ValueError, match="ns_steps"):
        MuonAdamW([{"kind": "muon", "params": [p], "lr": 0.1, "ns_steps": 0}])
    with pytest.raises(ValueError, match="betas"):
        MuonAdamW([{"kind": "adamw", "params": [p], "lr": 0.1, "betas": (0.9, 1.0)}])
    with pytest.raises(ValueError, match="beta2"):
        MuonAdamW([{"kind": "muon", "params": [p], "lr": 0.1, "beta2": 1.0}])
    with pytest.raises(ValueError, match="orthogonalize needs a matrix"):
        orthogonalize(torch.ones(3))


def test_compiled_step_matches_eager_and_a_new_schedule_does_not_recompile():
    """compile_step(): the same parameters and state as the eager step over steps whose lr,
    momentum and weight decay change, with one compiled graph per shape, never more."""
    from torch._dynamo.utils import counters

    initial = _make_params()
    initial["big"] = torch.randn(256, 256, generator=torch.Generator().manual_seed(5))  # a compiled AdamW param
    runs = {}
    for variant in ("eager", "compiled"):
        params = {name: nn.Parameter(value.clone()) for name, value in initial.items()}
        opt = _make_optimizer(MuonAdamW, params)
        opt.add_param_group({"kind": "adamw", "params": [params["big"]], "lr": 0.01, "weight_decay": 0.1})
        if variant == "compiled":
            torch._dynamo.reset()
            counters.clear()
            opt.compile_step()
        for step in range(STEPS):
            _step(opt, params, step, rank=0)
            if variant == "compiled" and step == 0:
                graphs_after_first_step = counters["stats"]["unique_graphs"]
        runs[variant] = (params, opt)
    # 3 Muon bucket shapes (8x16, 12x4, 5x7) and the one AdamW param over COMPILED_ADAMW_MIN_NUMEL
    assert graphs_after_first_step == 4
    assert counters["stats"]["unique_graphs"] == graphs_after_first_step
    (eager, eager_opt), (compiled, compiled_opt) = runs["eager"], runs["compiled"]
    for name in initial:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)
        for key, value in eager_opt.state[eager[name]].items():
            torch.testing.assert_close(compiled_opt.state[compiled[name]][key], value, rtol=1e-5, atol=1e-6)
