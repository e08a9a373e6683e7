"""The training loss of the language-model head without its logits tensor: the lm_head matmul, the
logit soft-cap and the cross-entropy, computed over chunks of rows.

The plain way (logits = x @ W^T for all N positions, soft-cap, cross-entropy) writes an (N, V) fp32
logits tensor and, in the backward pass, an (N, V) gradient of the same size, each read two or
three times: 64 MiB apiece at a d4 step (4096 positions, 4096 tokens), 8.6 GiB at a d20 step on a
GPU (65,536 positions, 32,768 tokens). Here each chunk's logits are computed, soft-capped and
turned into the loss and into the gradient of the loss with respect to the chunk's logits while
they are small enough to stay in cache; that gradient then gives the chunk's share of dL/dx and
dL/dW at once, so the backward pass only scales what the forward pass computed. The matmuls are
the same three as the plain way's (logits, dL/dx, dL/dW): nothing is recomputed.

`chunked_softcap_cross_entropy` returns the same loss as
`F.cross_entropy(softcap * tanh((x @ W^T) / softcap), targets, ignore_index=-1)` and the same
gradients, to fp32 rounding (tests/test_gpt.py checks both against float64).
"""

import torch
from torch import Tensor

# A chunk's logits (rows x vocab, fp32) are at most this many bytes: on a CPU, about a core's L2
# cache; on a GPU, large enough that each chunk's kernels are big, small enough to save most of
# the logits' memory.
CHUNK_BYTES = {"cpu": 2 * 2**20, "cuda": 512 * 2**20}


def chunk_rows(vocab_size: int, device: torch.device) -> int:
    """How many rows of logits go in one chunk on `device`."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    return max(1, budget // (4 * vocab_size))


def soft_cap(logits: Tensor, cap: float) -> Tensor:
    """Logits squashed smoothly into (-cap, cap): cap * tanh(logits / cap), computed as
    2 cap * sigmoid(2 logits / cap) - cap, the same function. PyTorch's CPU tanh is several times
    slower than its sigmoid (2-CPU AMD EPYC, one thread: 2.0 ms against 0.43 ms for a 128 x 4096
    chunk of the training loss, 78 us against 27 us for a 32 x 512 decoding step; compiled, 1.1 ms
    against 0.55 ms). fp32 rounding moves a capped logit by at most about 4e-6."""
    return torch.sigmoid(logits * (2.0 / cap)) * (2.0 * cap) - cap


def _row_chunks(num_rows: int, rows_per_chunk: int):
    return (slice(start, start + rows_per_chunk) for start in range(0, num_rows, rows_per_chunk))


def _chunk_loss(x: Tensor, weight: Tensor, targets: Tensor, softcap: float):
    """One chunk of rows: its summed loss, and what its gradient needs (the soft-capped logits,
    their log-normalizer, the target column of each row and which rows count)."""
    capped = soft_cap(torch.mm(x, weight.t()).float(), softcap)
    log_normalizer = torch.logsumexp(capped, dim=1, keepdim=True)
    valid = (targets >= 0).unsqueeze(1)
    picked_targets = targets.clamp_min(0).unsqueeze(1)
    losses = log_normalizer - capped.gather(1, picked_targets)
    return torch.where(valid, losses, 0.0).sum(), (capped, log_normalizer, picked_targets, valid)


def _chunk_loss_and_logit_grad(x: Tensor, weight: Tensor, targets: Tensor, softcap: float) -> tuple[Tensor, Tensor]:
    """The summed loss of one chunk of rows and its gradient with respect to the chunk's logits
    before the soft-cap, (rows, V) in x's dtype. Rows whose target is -1 add nothing to either."""
    loss, (capped, log_normalizer, picked_targets, valid) = _chunk_loss(x, weight, targets, softcap)
    # d(loss)/d(capped) = softmax - one_hot(target); d(capped)/d(logits) = 1 - (capped / softcap)^2.
    grad = torch.exp(capped - log_normalizer)
    grad.scatter_add_(1, picked_targets, torch.full_like(log_normalizer, -1.0))
    grad = torch.where(valid, grad * (1.0 - (capped / softcap).square()), 0.0)
    return loss, grad.to(x.dtype)


class _ChunkedSoftcapCrossEntropySum(torch.autograd.Function):
    """The summed loss; the forward pass also computes its gradients, which backward scales."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, softcap: float, rows_per_chunk: int) -> Tensor:
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for rows in _row_chunks(x.size(0), rows_per_chunk):
            loss, grad_logits = _chunk_loss_and_logit_grad(x[rows], weight, targets[rows], softcap)
            total = total + loss
            torch.mm(grad_logits, weight, out=grad_x[rows])
            if grad_logits.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), x[rows])
            else:
                grad_weight.add_(torch.mm(grad_logits.t(), x[rows]).float())
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_total.to(grad_x.dtype), grad_weight * grad_total.to(grad_weight.dtype), None, None, None


def chunked_softcap_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, softcap: float,
                                  reduction: str = "mean") -> Tensor:
    """Cross-entropy of `softcap * tanh((x @ weight^T) / softcap)` against `targets` (-1 = ignored),
    in fp32, from x (N, C) and weight (V, C) of one dtype; reduction 'mean' (over the targets that
    are not ignored) or 'sum'."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chunked_softcap_cross_entropy reduces by 'mean' or 'sum', got {reduction!r}")
    rows_per_chunk = chunk_rows(weight.size(0), x.device)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        total = _ChunkedSoftcapCrossEntropySum.apply(x, weight, targets, softcap, rows_per_chunk)
    else:  # evaluation: the loss alone
        total = sum(_chunk_loss(x[rows], weight, targets[rows], softcap)[0]
                    for rows in _row_chunks(x.size(0), rows_per_chunk))
    if reduction == "sum":
        return total
    return total / (targets >= 0).sum()
