"""Bits per byte: the validation metric of pretraining, and the unigram baseline it must beat.

Mean loss per token depends on the tokenizer (a bigger vocab has fewer, harder tokens); loss per
byte of text does not, so runs with different tokenizers compare. Every target token's loss (in
nats) is summed together with the UTF-8 byte length of the target token; special tokens count 0
bytes and are left out, as are ignored targets (-1). In a distributed run the sums are
all-reduced, so every rank returns the same number.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, num_steps: int, token_bytes: torch.Tensor) -> float:
    """bits per byte of `model` over the first `num_steps` (x, y) batches of `batches`."""
    device = model.get_device()
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(num_steps):
        try:
            x, y = next(batch_iter)
        except StopIteration:
            break
        x, y = x.to(device), y.to(device)
        loss = model(x, y, loss_reduction="none").reshape(-1)
        targets = y.reshape(-1)
        valid = targets >= 0
        nbytes = torch.where(valid, token_bytes[targets.clamp(min=0)], torch.zeros_like(targets))
        counted = nbytes > 0
        total_nats += (loss * counted).sum().double()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        raise ValueError("no bytes were evaluated: the validation batches are empty or contain only "
                         "special tokens")
    return total_nats.item() / (math.log(2) * total_bytes.item())


def unigram_bpb(targets: torch.Tensor, token_bytes: torch.Tensor) -> float:
    """Bits per byte of the best unigram model of `targets` in hindsight: every token costs
    -log2 of its own frequency in `targets`. A model that beats it uses context; one that does not
    has learned little more than word frequencies. Counted as evaluate_bpb counts: special tokens
    (0 bytes) and ignored targets (-1) are left out."""
    token_bytes = token_bytes.to(targets.device)
    targets = targets.reshape(-1)
    targets = targets[targets >= 0]
    targets = targets[token_bytes[targets] > 0]
    if targets.numel() == 0:
        raise ValueError("no bytes to measure: the targets are empty or contain only special tokens")
    counts = torch.bincount(targets, minlength=len(token_bytes)).double()
    seen = counts > 0
    bits = -(counts[seen] * torch.log2(counts[seen] / targets.numel())).sum()
    return float(bits / (counts * token_bytes.double()).sum())
