"""MuonAdamW: one optimizer that trains the GPT's matrices with Muon and everything else with AdamW.

Why two rules: Muon (momentum, then orthogonalize the update by a polynomial iteration)
trains the hidden 2-D weight matrices faster than Adam, but it is the wrong tool for
embeddings, the lm_head and scalar gains, which keep AdamW. The trainer builds one optimizer
over parameter groups tagged with `kind='muon'` or `kind='adamw'`:

    adamw group: params, lr, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0
    muon group:  params (2-D, any mix of shapes), lr, momentum=0.95, ns_steps=5, beta2=0.9,
                 weight_decay=0.0

The Muon step, as the nanochat reference takes it today: Nesterov momentum; row equilibration
(every row rescaled to the mean row norm, so the spectrum is better conditioned); Polar Express
orthogonalization (arXiv:2505.16932); the Frobenius norm reset to that of an exactly
semi-orthogonal matrix; NorMuon variance reduction (arXiv:2510.05491: each row, or each column
of a wide matrix, divided by the root of a running mean of its squared update, then the whole
update rescaled back to its norm; `beta2` is that running mean's decay); and cautious weight
decay, which only decays the entries whose update points the same way as the weight.

Every group also gets `initial_lr` (the lr it was built with), because the trainer sets
`group['lr'] = group['initial_lr'] * schedule(step)` and, for muon groups, `group['momentum']`
and `group['weight_decay']` before each step; `step()` reads them afresh every time.

`compile_step()` runs the update math through torch.compile (the trainers call it when they
compile the model).

Inside a muon group the matrices are bucketed by shape, so that all same-shaped matrices
(e.g. every layer's c_q) are stacked and orthogonalized in one batched matmul chain.

`DistMuonAdamW` is the data-parallel variant used instead of DDP: it averages the gradients
itself and splits the optimizer work between ranks (ZeRO-2 style), so each rank holds only its
share of the optimizer state. See its docstring for the communication pattern.
"""

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.common import COMPUTE_DTYPE, get_dist_info

# Polar Express (Amsel, Persson, Musco, Gower, arXiv:2505.16932): one quintic s -> a*s + b*s^3 + c*s^5
# per iteration, each chosen for the interval the previous ones leave the singular values in, so
# that 5 iterations bring every singular value of a Frobenius-normalized matrix close to 1
# (these are the paper's coefficients for 5 iterations, safety factor 2e-2, cushion 2). Further
# iterations repeat the last quintic, which keeps values near 1 there.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.01  # the input is divided by 1.01 x its norm: the coefficients assume s <= 1

ADAMW_DEFAULTS = {"betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0}
MUON_DEFAULTS = {"momentum": 0.95, "ns_steps": 5, "beta2": 0.9, "weight_decay": 0.0}
GROUP_DEFAULTS = {"adamw": ADAMW_DEFAULTS, "muon": MUON_DEFAULTS}
COMPILED_ADAMW_MIN_NUMEL = 1 << 16  # MuonAdamW.compile_step compiles the AdamW update of params this large

# Older torch names the single-tensor collectives reduce_scatter_tensor / all_gather_into_tensor;
# torch 2.13 renames them *_single and warns on the old names. Gloo implements both, async
# included (checked on torch 2.13), so the same code runs on gloo (CPU tests) and NCCL. Gradients
# are reduced with SUM and then divided, because not every gloo build implements ReduceOp.AVG.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def orthogonalize(matrices: Tensor, steps: int = 5) -> Tensor:
    """Approximately orthogonalize a matrix or a stack of matrices (..., rows, cols) by Polar Express.

    Returns U S' V^T for the SVD U S V^T of each matrix, with S' = p(S / (1.01 ||X||_F)) for the
    composition p of the quintics above, so the singular values end close to 1. Runs in bf16 on
    CUDA when the compute dtype is bf16 (the iteration is stable there and bf16 matmuls are fast),
    else in fp32; the result has the input's dtype.
    """
    if matrices.dim() < 2:
        raise ValueError(f"orthogonalize needs a matrix or a stack of matrices, "
                         f"got a tensor of shape {tuple(matrices.shape)}")
    x = matrices.float()
    # Iterate on the wide orientation so the Gram matrix x @ x^T is the smaller of the two.
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * POLAR_EXPRESS_SAFETY + 1e-6)
    if x.is_cuda and COMPUTE_DTYPE == torch.bfloat16:
        x = x.bfloat16()
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])  # baddbmm wants exactly one batch dimension
    for i in range(steps):
        a, b, c = POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)]
        gram = torch.bmm(x, x.mT)
        # a*x + (b*gram + c*gram@gram) @ x as two fused multiply-adds: the scaling and the sums
        # happen inside the matmul kernels, not as five separate passes over the matrices
        # (which took a third of the optimizer step on CPU).
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, polynomial, x, beta=a)
    x = x.reshape(*batch_shape, *x.shape[-2:])
    if tall:
        x = x.mT
    return x.to(matrices.dtype)


def equilibrate_rows(matrices: Tensor) -> Tensor:
    """Rescale every row of each matrix (..., rows, cols) to the matrix's mean row norm (RMS over
    rows), which keeps its Frobenius norm and evens out the spectrum before orthogonalization."""
    x = matrices.float()
    mean_row_norm = x.norm(dim=(-2, -1), keepdim=True) / x.size(-2) ** 0.5
    row_norms = x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return (x * (mean_row_norm / row_norms)).to(matrices.dtype)


def _bucket_by_shape(params: list[Tensor]) -> list[list[Tensor]]:
    """Split params into lists of same shape, dtype and device, in first-seen order.

    The order is deterministic given the params' order, which the distributed variant relies
    on: every rank must build the same buckets to agree on who owns which matrix.
    """
    buckets: dict[tuple, list[Tensor]] = {}
    for p in params:
        buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
    return list(buckets.values())


def _normuon_(update: Tensor, second_moments: Tensor, beta2: float) -> Tensor:
    """NorMuon variance reduction of a stack of orthogonalized updates (K, rows, cols), in place on
    `second_moments` (K, rows, 1) for tall or square matrices, (K, 1, cols) for wide ones: the
    running mean of each row's (column's) mean squared entry. Every row (column) is divided by
    the root of its running mean; the result is rescaled to the update's Frobenius norm."""
    reduce_dim = -1 if update.size(-2) >= update.size(-1) else -2
    second_moments.lerp_(update.square().mean(dim=reduce_dim, keepdim=True), 1.0 - beta2)
    normalized = update * second_moments.clamp_min(1e-10).rsqrt()
    norm_ratio = update.norm(dim=(-2, -1), keepdim=True) / normalized.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    return normalized * norm_ratio


def _muon_update_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                  second_moments: list[Tensor], momentum, lr, weight_decay, beta2, ns_steps: int) -> None:
    """One Muon step, in place, for same-shaped matrices `params` with (averaged) `grads` and each
    matrix's momentum and second-moment state. The hyper-parameters are floats, or 0-D fp32 tensors
    when the step is compiled (a float would be a constant of the compiled code, recompiled at
    every new learning rate)."""
    # Nesterov momentum in lerp form: buf <- m*buf + (1-m)*g, then step along (1-m)*g + m*buf.
    torch._foreach_lerp_(momentum_buffers, grads, 1.0 - momentum)
    nesterov = torch._foreach_lerp(grads, momentum_buffers, momentum)
    update = orthogonalize(equilibrate_rows(torch.stack(nesterov)), ns_steps).float()
    rows, cols = params[0].shape
    # Reset the norm to sqrt(min(rows, cols)), an exactly semi-orthogonal matrix's, which the
    # iteration only approaches.
    update = update * (min(rows, cols) ** 0.5 / update.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    stacked_moments = torch.stack(second_moments).float()
    update = _normuon_(update, stacked_moments, beta2)
    torch._foreach_copy_(second_moments, list(stacked_moments.unbind(0)))
    # An orthogonalized (rows, cols) update has RMS entry 1/sqrt(max(rows, cols)); the factor
    # keeps the per-entry step size of tall matrices comparable to that of wide ones. It scales
    # the weight decay too.
    step = lr * max(1.0, rows / cols) ** 0.5
    weights = torch.stack(params).float()
    # Cautious weight decay: only where the update and the weight agree in sign.
    if isinstance(weight_decay, Tensor) or weight_decay != 0.0:
        update = update + weight_decay * (weights * ((update * weights) >= 0))
    weights.sub_(step * update)
    torch._foreach_copy_(params, list(weights.unbind(0)))


def _adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, lr, beta1, beta2, eps,
                   weight_decay, bias_correction1, bias_correction2) -> None:
    """One bias-corrected AdamW step, in place, with decoupled weight decay; the hyper-parameters
    are floats or 0-D fp32 tensors, as for _muon_update_.

    The math runs in fp32 even for bf16 params (1 - beta2 is not representable in bf16);
    the state is kept in the param's dtype so that load_state_dict, which casts state to the
    param's dtype, gives back exactly what was saved.
    """
    # .float() is a no-op on fp32 tensors, so in the common case the ops below are in place.
    param32, exp_avg32, exp_avg_sq32 = param.float(), exp_avg.float(), exp_avg_sq.float()
    grad32 = grad.float()
    param32.mul_(1.0 - lr * weight_decay)
    exp_avg32.lerp_(grad32, 1.0 - beta1)
    exp_avg_sq32.lerp_(grad32.square(), 1.0 - beta2)
    denom = (exp_avg_sq32 / bias_correction2).sqrt_().add_(eps)
    if isinstance(lr, Tensor):
        param32.sub_(exp_avg32 / denom * (lr / bias_correction1))
    else:
        param32.addcdiv_(exp_avg32, denom, value=-lr / bias_correction1)
    for target, result in ((param, param32), (exp_avg, exp_avg32), (exp_avg_sq, exp_avg_sq32)):
        if target is not result:
            target.copy_(result)


def _hyper_tensor(value: float) -> Tensor:
    """A hyper-parameter as the compiled update takes it: a 0-D fp32 tensor on the CPU (which
    mixes with tensors of any device as a scalar does)."""
    return torch.tensor(value, dtype=torch.float32)


def _check_muon_group(group: dict) -> None:
    for index, p in enumerate(group["params"]):
        if p.dim() != 2:
            raise ValueError(f"muon group parameter {index} has shape {tuple(p.shape)}, but Muon only "
                             f"handles 2-D matrices; put it in an 'adamw' group instead")
    if not 0.0 <= group["momentum"] < 1.0:
        raise ValueError(f"muon 'momentum' must be in [0, 1), got {group['momentum']!r}")
    if not 0.0 <= group["beta2"] < 1.0:
        raise ValueError(f"muon 'beta2' must be in [0, 1), got {group['beta2']!r}")
    ns_steps = group["ns_steps"]
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"muon 'ns_steps' must be a positive int (5 is the usual), got {ns_steps!r}")


def _check_adamw_group(group: dict) -> None:
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"adamw 'betas' must be two numbers in [0, 1), got {betas!r}")
    if group["eps"] <= 0.0:
        raise ValueError(f"adamw 'eps' must be positive, got {group['eps']!r}")


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the 2-D matrices of 'muon' groups, AdamW for the params of 'adamw' groups.

    param_groups: a list of dicts, each with 'kind' ('muon' or 'adamw'), 'params' and 'lr'; the
    other keys default as in the module docstring. Parameters whose .grad is None are skipped.
    Muon keeps a momentum buffer and a per-row (per-column if wide) second moment per matrix in
    `self.state[p]['momentum_buffer']` and `['second_momentum_buffer']`; AdamW keeps
    'step', 'exp_avg' and 'exp_avg_sq' per param.
    """

    def __init__(self, param_groups: Iterable[dict]):
        param_groups = list(param_groups)
        if not param_groups or not all(isinstance(g, dict) for g in param_groups):
            raise ValueError("MuonAdamW takes a non-empty list of parameter group dicts, e.g. "
                             "[{'kind': 'muon', 'params': matrices, 'lr': 0.02}, "
                             "{'kind': 'adamw', 'params': others, 'lr': 0.004}]")
        super().__init__(param_groups, defaults={})
        self._compiled_muon = self._compiled_adamw = None

    def compile_step(self) -> None:
        """Run the update math through torch.compile from the next step on: the elementwise passes
        of each Muon bucket and of each AdamW param of at least COMPILED_ADAMW_MIN_NUMEL entries
        are fused. The hyper-parameters then go in as 0-D tensors, so that a new learning rate or
        momentum does not recompile. Every shape is one compiled graph; the small AdamW params
        (the per-layer scalars, the smear gate) stay eager, which keeps the count under dynamo's
        recompile limit and costs nothing measurable."""
        self._compiled_muon = torch.compile(_muon_update_, dynamic=False, fullgraph=True)
        self._compiled_adamw = torch.compile(_adamw_update_, dynamic=False, fullgraph=True)

    def add_param_group(self, param_group: dict) -> None:
        """Validate a group, fill in the defaults of its kind and record its initial_lr."""
        group = dict(param_group)
        kind = group.get("kind")
        if kind not in GROUP_DEFAULTS:
            raise ValueError(f"unknown optimizer group kind={kind!r}: every parameter group needs "
                             f"'kind' set to 'muon' (2-D matrices) or 'adamw' (everything else)")
        allowed = {"kind", "params", "lr", "initial_lr", *GROUP_DEFAULTS[kind]}
        unknown = sorted(set(group) - allowed)
        if unknown:
            raise ValueError(f"the {kind!r} parameter group has unknown keys {unknown}; "
                             f"the keys it accepts are {sorted(allowed)}")
        if "lr" not in group:
            raise ValueError(f"the {kind!r} parameter group has no 'lr'; give each group a learning rate")
        for key, value in GROUP_DEFAULTS[kind].items():
            group.setdefault(key, value)
        params = group.get("params")
        group["params"] = [params] if isinstance(params, Tensor) else list(params or [])
        if kind == "muon":
            _check_muon_group(group)
        else:
            _check_adamw_group(group)
        group["initial_lr"] = group["lr"]
        super().add_param_group(group)

    def _muon_update(self, params: list[Tensor], grads: list[Tensor], group: dict) -> None:
        """One Muon step of same-shaped matrices, creating their state as zeros on first use: a
        momentum buffer, and a second moment per row (per column for a wide matrix)."""
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            if "second_momentum_buffer" not in state:
                rows, cols = p.shape
                state["second_momentum_buffer"] = p.new_zeros((rows, 1) if rows >= cols else (1, cols))
        kernel, hyper = (self._compiled_muon, _hyper_tensor) if self._compiled_muon is not None else (_muon_update_, float)
        kernel(params, grads, [self.state[p]["momentum_buffer"] for p in params],
               [self.state[p]["second_momentum_buffer"] for p in params], hyper(group["momentum"]), hyper(group["lr"]),
               hyper(group["weight_decay"]), hyper(group["beta2"]), group["ns_steps"])

    def _adamw_update(self, param: Tensor, grad: Tensor, group: dict, update: Tensor | None = None) -> None:
        """One AdamW step of `param`, or of `update`, a slice of it whose state `param`'s holds
        (created as zeros of the slice's shape on first use)."""
        state = self.state[param]
        update = param if update is None else update
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(update)
            state["exp_avg_sq"] = torch.zeros_like(update)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        compiled = self._compiled_adamw is not None and update.numel() >= COMPILED_ADAMW_MIN_NUMEL
        kernel, hyper = (self._compiled_adamw, _hyper_tensor) if compiled else (_adamw_update_, float)
        kernel(update, grad, state["exp_avg"], state["exp_avg_sq"], hyper(group["lr"]), hyper(beta1), hyper(beta2),
               hyper(group["eps"]), hyper(group["weight_decay"]), hyper(1.0 - beta1 ** state["step"]),
               hyper(1.0 - beta2 ** state["step"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["kind"] == "adamw":
                for p in params:
                    self._adamw_update(p, p.grad, group)
            else:
                for bucket in _bucket_by_shape(params):
                    self._muon_update(bucket, [p.grad for p in bucket], group)
        return loss


class DistMuonAdamW(MuonAdamW):
    """MuonAdamW for data-parallel training without DDP: step() averages the gradients across
    ranks and splits the optimizer work between them. Every rank must build it over the same
    parameters in the same order. With no process group, or a world size of 1, it is MuonAdamW.

    Communication (async collectives; three phases so that later reductions and earlier
    gathers run while a rank computes):
      1. launch every gradient reduction;
      2. in order: wait for a reduction, update this rank's share, launch the gather of the result;
      3. wait for the gathers and copy gathered matrices into place.

    Muon: the K same-shaped matrices of a bucket are stacked (zero-padded to a multiple of the
    world size W) and reduce-scattered, so rank r receives the averaged gradients of matrices
    [r*ceil(K/W), (r+1)*ceil(K/W)) (the last ranks may own fewer, or none); it runs Muon on those
    and the updated matrices are all-gathered.
    AdamW: a param whose dim 0 divides by W is reduce-scattered along dim 0; each rank updates its
    slice and keeps Adam state for that slice only, then the slices are all-gathered in place.
    Other params (scalars, odd shapes) are all-reduced and updated fully on every rank.

    Checkpoints: optimizer state is per rank. Each rank's state_dict() holds only that rank's
    shard (momentum of the matrices it owns, Adam state of its slices and of the replicated
    params) and must be loaded back by the same rank at the same world size; load_state_dict
    raises ValueError when the world size differs. step() may overwrite .grad with reduced
    values; call zero_grad() afterwards as usual. A param with no grad on a rank counts as a zero
    gradient from that rank, so that all ranks always run the same collectives.
    """

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["world_size"] = get_dist_info()[3]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved_world_size = state_dict.pop("world_size", 1)
        world_size = get_dist_info()[3]
        if saved_world_size != world_size:
            raise ValueError(f"this optimizer state was saved by a run with world size {saved_world_size}, "
                             f"but the current world size is {world_size}; optimizer state is sharded per "
                             f"rank, so resume with {saved_world_size} ranks or start the optimizer fresh")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        is_distributed, rank, _, world_size = get_dist_info()
        if not is_distributed:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        launched = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                launched += [self._launch_adamw(p, group, rank, world_size) for p in group["params"]]
            else:
                launched += [self._launch_muon(bucket, group, rank, world_size)
                             for bucket in _bucket_by_shape(group["params"])]
        finishers = [update_and_gather() for update_and_gather in launched]
        for finish in finishers:
            finish()
        return loss

    def _launch_adamw(self, param: Tensor, group: dict, rank: int, world_size: int):
        """Phase 1 for one AdamW param; returns phase 2, which returns phase 3."""
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        sharded = param.dim() >= 1 and param.shape[0] % world_size == 0
        if sharded:
            slice_rows = param.shape[0] // world_size
            grad_slice = torch.empty_like(grad[:slice_rows])
            reduction = _reduce_scatter_single(grad_slice, grad, op=dist.ReduceOp.SUM, async_op=True)
        else:
            grad_slice = grad
            reduction = dist.all_reduce(grad, op=dist.ReduceOp.SUM, async_op=True)

        def update_and_gather():
            reduction.wait()
            grad_slice.div_(world_size)
            if not sharded:
                self._adamw_update(param, grad_slice, group)
                return lambda: None
            param_slice = param[rank * slice_rows:(rank + 1) * slice_rows]
            self._adamw_update(param, grad_slice, group, update=param_slice)
            # Gathering from a slice of the output itself is the in-place form NCCL documents
            # (and gloo handles), so no extra buffer is needed.
            gather = _all_gather_single(param, param_slice, async_op=True)
            return gather.wait

        return update_and_gather

    def _launch_muon(self, params: list[Tensor], group: dict, rank: int, world_size: int):
        """Phase 1 for one same-shape bucket of matrices; returns phase 2, which returns phase 3."""
        num_params = len(params)
        per_rank = -(-num_params // world_size)
        zeros = torch.zeros_like(params[0])
        grads = [p.grad if p.grad is not None else zeros for p in params]
        stacked = torch.stack(grads + [zeros] * (per_rank * world_size - num_params))
        grad_chunk = torch.empty_like(stacked[:per_rank])
        reduction = _reduce_scatter_single(grad_chunk, stacked, op=dist.ReduceOp.SUM, async_op=True)
        first, end = min(rank * per_rank, num_params), min((rank + 1) * per_rank, num_params)
        owned = params[first:end]

        def update_and_gather():
            reduction.wait()
            if owned:
                owned_grads = list(grad_chunk[:len(owned)].div_(world_size).unbind(0))
                self._muon_update(owned, owned_grads, group)
                # The reduced gradients are used up: reuse their buffer to send the updated matrices.
                grad_chunk[:len(owned)].copy_(torch.stack(owned))
            # The stacked gradients are used up too: reuse them to receive every rank's matrices.
            gather = _all_gather_single(stacked, grad_chunk, async_op=True)

            def copy_back():
                gather.wait()
                others = params[:first] + params[end:]
                if others:
                    gathered = list(stacked.unbind(0))
                    torch._foreach_copy_(others, gathered[:first] + gathered[end:num_params])

            return copy_back

        return update_and_gather
