"""The GPT model of nanochat: a decoder-only transformer with the seed's modern details.

- token embedding followed by a parameter-free RMSNorm; untied lm_head; no biases anywhere;
  the vocabulary is padded to a multiple of 64 so the embedding and head matmuls tile well;
- rotary position embeddings (no learned positions), QK norm, grouped-query attention;
- sliding-window attention from a pattern string ("SSSL": S = a quarter of the context,
  L = full) tiled over the layers, the last layer always full;
- value embeddings (ResFormer) on alternating layers, mixed into the values through an
  input-dependent gate;
- QK norm followed by a fixed gain on q and k (1.2 by default);
- ReLU^2 MLP of 4x width;
- per-layer learnable residual scales (resid_lambdas) and skip weights from the normalized
  input embedding (x0_lambdas);
- smear: each position mixes in the previous token's normalized embedding through a small
  input-dependent gate (cheap bigram information); with a KV cache the previous embedding is
  carried per row, so decoding one token at a time sees what the full forward sees;
- backout: a learned fraction of the residual stream after the middle layer is subtracted before
  the final norm;
- logits soft-capped at 15, loss in fp32 with ignore index -1.

Precision is explicit instead of autocast: parameters (master weights) are fp32, activations
and matmuls run in nanochat.common.COMPUTE_DTYPE (bf16 on modern GPUs, fp32 on CPU); every
linear layer casts its weight to the activation dtype on the fly. `store_embeddings_in` keeps the
embedding tables in another dtype (bf16, as nanochat stores them), and `enable_fp8`
(nanochat.fp8) runs the large linear layers' training matmuls in fp8.

Weights are created on the meta device and materialised with `to_empty()` + `init_weights()`,
so building a large model never allocates memory twice.
"""

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE, get_dist_info, print0
from nanochat.flash_attention import RowPositions, attention_backend, flash_attn_func, flash_attn_with_kvcache
from nanochat.fp8 import fp8_linear
from nanochat.lm_loss import chunked_softcap_cross_entropy, soft_cap

LOGIT_SOFTCAP = 15.0
VOCAB_PAD_MULTIPLE = 64
SMEAR_GATE_CHANNELS = 24  # the smear gate reads this many leading channels of the embedding (all, if narrower)
SMEAR_LR = 0.2  # AdamW learning rate of the smear and backout scalars (not scaled with the width)
BACKOUT_INIT = 0.2
NANOCHAT_WINDOW_MULTIPLE = 128  # nanochat rounds short windows up to its attention kernel's tile
# Fields that checkpoints written before they existed lack, with the value those models were
# built with: no smear, no backout, a value-embedding gate over 32 channels, windows unrounded.
LEGACY_CONFIG = {"smear": False, "backout": False, "ve_gate_channels": 32, "window_multiple": 1}
# The rows of x for which a linear layer inside GPT.transposed_weights multiplies by the laid-out
# transpose of its weight, by the layer's shape (MKL, torch 2.13, one thread). On a 2-CPU Xeon every
# layer of a depth-4 and a depth-6 model ran faster that way at 3 to 8 rows (a 384 -> 32768 head at
# 8 rows: 5.2 ms against 6.4), not at 16 (9.6 against 6.6), and a prefill's many rows gain nothing.
# On a 2-CPU AMD EPYC a layer that widens or keeps the width gains from a single row (with weights
# that do not stay in cache: a 256 -> 4096 head at 1 row 144 us against 494, 256 -> 1024 22 against
# 33), while one that narrows loses at 1 and 2 rows (1024 -> 256 at 1 row: 28 us against 22).
TRANSPOSED_ROWS_WIDENING = (1, 8)   # out_features >= in_features
TRANSPOSED_ROWS_NARROWING = (3, 8)  # out_features < in_features
ROTARY_HEADROOM = 10  # rotary tables cover 10x the training context, for long generations
# The dtypes the embedding tables may be stored and updated in (base_train --embedding-dtype).
EMBEDDING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"
    smear: bool = True
    backout: bool = True
    value_embeds: bool = True
    ve_gate_channels: int = 12  # leading channels of its input that the value-embedding gate reads (at most n_embd)
    ve_gate_range: float = 3.0  # the value-embedding gate lies in (0, ve_gate_range)
    qk_gain: float = 1.2  # q and k are scaled by this after their norm: sharper attention at init
    rope_base: float = 100000.0
    # The short window is the context divided by short_window_divisor, rounded up to a multiple
    # of window_multiple: nanochat rounds to 128 (its kernel's tile); 1 keeps the plain fraction,
    # which lets tiny test models with short contexts still have windows shorter than their
    # context. The two agree whenever the context is a multiple of 512.
    short_window_divisor: int = 4
    window_multiple: int = 1

    @classmethod
    def from_dict(cls, fields: dict) -> "GPTConfig":
        """The config saved as a dict; fields the dict lacks (a checkpoint older than them) take
        the values the models of that time were built with (LEGACY_CONFIG)."""
        return cls(**{**LEGACY_CONFIG, **fields})

    def __post_init__(self):
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        elif (self.n_embd // self.n_head) % 2:
            problems.append(f"head dim {self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            problems.append(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            problems.append(f"window_pattern={self.window_pattern!r} must be a non-empty string of S and L")
        if min(self.sequence_len, self.vocab_size, self.n_layer, self.ve_gate_channels, self.short_window_divisor,
               self.window_multiple) < 1:
            problems.append("sequence_len, vocab_size, n_layer, ve_gate_channels, short_window_divisor and "
                            "window_multiple must be positive")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))


def config_from_depth(depth: int, aspect_ratio: int = 64, head_dim: int = 128, sequence_len: int = 2048,
                      vocab_size: int = 32768, window_pattern: str = "SSSL") -> GPTConfig:
    """The single complexity dial: width = depth * aspect_ratio rounded up to a multiple of the
    head dim, heads = width / head_dim (full multi-head attention: n_kv_head = n_head). Short
    windows are rounded up to a multiple of 128 as in nanochat, so that a model trained at a short
    context (the tiny preset's 256: windows of 128, not 64) is nanochat's model at that context."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    width = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = width // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=width, window_pattern=window_pattern,
                     window_multiple=NANOCHAT_WINDOW_MULTIPLE)


def padded_rows(sequences: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """Token sequences of different lengths as one (rows, longest) tensor, each padded at its end
    by repeating its last token: the input of GPT.forward's row_lengths, where the padding is never
    seen by a real position, so any id would do."""
    longest = max(len(sequence) for sequence in sequences)
    return torch.tensor([sequence + sequence[-1:] * (longest - len(sequence)) for sequence in sequences],
                        dtype=torch.long, device=device)


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without learnable parameters."""
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings sit on alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dims of x (B, T, H, D) by the angles
    whose cos/sin are given as (B or 1, T, 1, D/2)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, without an op when it already is: a no-op .to() still costs a dispatch,
    which a decoding step on a CPU pays per call."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class Linear(nn.Linear):
    """A bias-free linear layer whose fp32 master weight is cast to the activation dtype. With
    `fp8` set (nanochat.fp8.enable_fp8) its matmuls run in fp8 while the model trains. Inside
    GPT.transposed_weights it multiplies by a transposed copy of its weight, when no gradient
    is wanted."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = False
        self.weight_t: torch.Tensor | None = None  # (in, out), contiguous: set by GPT.transposed_weights
        # The rows of a pass that multiply by weight_t (see TRANSPOSED_ROWS_WIDENING).
        self.transposed_rows = TRANSPOSED_ROWS_WIDENING if out_features >= in_features else TRANSPOSED_ROWS_NARROWING

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight_t = self.weight_t
        if (weight_t is not None and self.transposed_rows[0] <= x.numel() // x.size(-1) <= self.transposed_rows[1]
                and weight_t.dtype == x.dtype and not torch.is_grad_enabled()):
            return x @ weight_t
        weight = self.weight
        if self.fp8 and self.training:
            return fp8_linear(x, weight)
        return F.linear(x, cast(weight, x.dtype))


def uninitialised_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An nn.Embedding without its default N(0, 1) init: GPT's weights come from init_weights() or
    a state dict, so that init would be thrown away, and on the meta device PyTorch runs it through
    a Python reference kernel that imports torch._dynamo, a second of every model process's start."""
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        kv_dim = self.n_kv_head * self.head_dim
        self.c_q = Linear(config.n_embd, config.n_embd)
        self.c_k = Linear(config.n_embd, kv_dim)
        self.c_v = Linear(config.n_embd, kv_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate = None
        self.ve_gate_range, self.qk_gain = config.ve_gate_range, config.qk_gain
        if config.value_embeds and has_value_embedding(layer_idx, config.n_layer):
            self.ve_gate_channels = min(config.ve_gate_channels, config.n_embd)
            self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head)

    def forward(self, x, value_embedding, cos, sin, window_size, kv_cache, cache_seqlens):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if value_embedding is not None:
            # ResFormer: mix the token's value embedding into the values; the gate (in (0, 3) by
            # default, a little over half of that at init because ve_gate starts small and
            # positive) lets each head decide how much to take.
            gate = torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels])).unsqueeze(-1)
            v = torch.addcmul(v, gate, value_embedding.view(B, T, self.n_kv_head, self.head_dim),
                              value=self.ve_gate_range)
        # Rotary embedding and QK norm act on each head alone, so q's and k's heads go through them
        # together: half the elementwise calls, which is what a decoding step on a CPU waits for.
        qk = norm(apply_rotary_emb(torch.cat([q, k], dim=2), cos, sin)) * self.qk_gain
        q, k = qk[:, :, :self.n_head], qk[:, :, self.n_head:]
        if kv_cache is None:
            y = flash_attn_func(q, k, v, causal=True, window_size=window_size)
        else:
            k_cache, v_cache = kv_cache.layer(self.layer_idx)
            y = flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                        causal=True, window_size=window_size)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, value_embedding, cos, sin, window_size, kv_cache, cache_seqlens):
        x = x + self.attn(norm(x), value_embedding, cos, sin, window_size, kv_cache, cache_seqlens)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # Choose the attention kernel now, outside any torch.compile trace: a first choice made
        # inside the trace is a graph break at every layer, and the compiled model then runs
        # the softcap and the loss eagerly (measured 15 graphs per step instead of 2).
        attention_backend()
        self.config = config
        self.padded_vocab_size = math.ceil(config.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.transformer = nn.ModuleDict({
            "wte": uninitialised_embedding(self.padded_vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, self.padded_vocab_size)
        self.value_embeds = nn.ModuleDict({
            str(i): uninitialised_embedding(self.padded_vocab_size, kv_dim)
            for i in range(config.n_layer) if config.value_embeds and has_value_embedding(i, config.n_layer)
        })
        # The same modules by layer index (None where a layer has none), for the forward pass.
        self.value_embed_of_layer = [self.value_embeds[str(i)] if str(i) in self.value_embeds else None
                                     for i in range(config.n_layer)]
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate_channels = min(SMEAR_GATE_CHANNELS, config.n_embd)
        self.smear_gate = Linear(self.smear_gate_channels, 1) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.full((1,), BACKOUT_INIT)) if config.backout else None
        self.backout_layer = config.n_layer // 2
        self.window_sizes = self._window_sizes(config)
        self.rotary_len = config.sequence_len * ROTARY_HEADROOM
        # Derived tables, not state: recomputed by init_buffers(), never saved in checkpoints.
        # Shaped (1, positions, 1, head_dim / 2) as attention broadcasts them: a decode step slices
        # them with one op instead of four.
        self.register_buffer("rotary_cos", torch.empty(1, self.rotary_len, 1, head_dim // 2), persistent=False)
        self.register_buffer("rotary_sin", torch.empty(1, self.rotary_len, 1, head_dim // 2), persistent=False)

    @staticmethod
    def _window_sizes(config: GPTConfig) -> list[tuple[int, int]]:
        """Per-layer (left, right) attention windows in Flash Attention's convention (-1 = unlimited)."""
        fraction = -(-config.sequence_len // config.short_window_divisor)
        short = (-(-fraction // config.window_multiple) * config.window_multiple, 0)
        pattern = config.window_pattern.upper()
        sizes = [short if pattern[i % len(pattern)] == "S" else (-1, 0) for i in range(config.n_layer)]
        sizes[-1] = (-1, 0)
        return sizes

    # ---------------------------------------------------------------- initialisation

    def to_empty(self, *, device, recurse: bool = True):
        """Materialise a meta-device model; the derived rotary tables are recomputed at once
        (to_empty leaves every tensor uninitialised, weights are set by init_weights() or a
        checkpoint)."""
        super().to_empty(device=device, recurse=recurse)
        self.init_buffers()
        return self

    @torch.no_grad()
    def init_buffers(self) -> None:
        head_dim = self.config.n_embd // self.config.n_head
        device = self.lm_head.weight.device
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / self.config.rope_base ** (channels / head_dim)
        angles = torch.outer(torch.arange(self.rotary_len, dtype=torch.float32, device=device), inv_freq)
        self.rotary_cos = angles.cos().to(COMPUTE_DTYPE)[None, :, None, :]
        self.rotary_sin = angles.sin().to(COMPUTE_DTYPE)[None, :, None, :]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (deterministic under torch.manual_seed), as the nanochat
        reference does today.

        Input-side matrices get uniform(-a, a) with a = sqrt(3/n_embd) (std 1/sqrt(n_embd)), the
        MLP's input 0.4x that; output projections start at zero so every block starts as the
        identity; the lm_head starts tiny so the initial loss is close to ln(vocab). The residual
        scales fall from 1.15 at the first layer to 1.05 at the last, the x0 skip weights from
        0.20 to 0.05. The smear starts off (smear_lambda 0) with its gate small and positive, the
        backout at BACKOUT_INIT."""
        n_embd, n_layer = self.config.n_embd, self.config.n_layer
        bound = math.sqrt(3.0 / n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for embedding in self.value_embeds.values():
            nn.init.uniform_(embedding.weight, -bound, bound)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        depth_frac = torch.arange(n_layer, dtype=torch.float32) / max(n_layer - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth_frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * depth_frac)
        if self.smear_gate is not None:
            nn.init.zeros_(self.smear_lambda)
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        if self.backout_lambda is not None:
            nn.init.constant_(self.backout_lambda, BACKOUT_INIT)
        self.init_buffers()

    # ---------------------------------------------------------------- bookkeeping

    def get_device(self) -> torch.device:
        return self.lm_head.weight.device

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by group (the optimizer's grouping), plus the total."""
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": sum(p.numel() for p in self._smear_backout_params()) + self.resid_lambdas.numel()
            + self.x0_lambdas.numel(),
        }
        counts["total"] = sum(counts.values())
        return counts

    def num_scaling_params(self) -> int:
        """Parameters that count for scaling laws (tokens : params ratio): the matmul weights of
        the blocks and the lm_head; lookup tables and scalars cost no FLOPs per token."""
        counts = self.param_counts()
        return counts["transformer_matrices"] + counts["lm_head"]

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per matmul parameter (forward + backward) plus attention
        scores and values, 12 * heads * head_dim * (attended keys) per layer."""
        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        attention = 0
        for left, _ in self.window_sizes:
            attended = cfg.sequence_len if left < 0 else min(left + 1, cfg.sequence_len)
            attention += 12 * cfg.n_head * head_dim * attended
        return 6 * self.num_scaling_params() + attention

    def store_embeddings_in(self, dtype: torch.dtype) -> None:
        """Store the token and value embedding tables in `dtype`, before the optimizer is built (its
        AdamW state is made in the parameters' dtype; the update itself runs in fp32 and is rounded
        back). nanochat keeps them in bf16 on GPUs: half their memory and optimizer traffic, and a
        lookup's result is cast to the compute dtype anyway. Checkpoints then hold them in `dtype`;
        a model built in fp32 loads them widened."""
        self.transformer.wte.to(dtype)
        for embedding in self.value_embeds.values():
            embedding.to(dtype)

    def _smear_backout_params(self) -> list[nn.Parameter]:
        params = [self.smear_gate.weight, self.smear_lambda] if self.smear_gate is not None else []
        return params + ([self.backout_lambda] if self.backout_lambda is not None else [])

    def setup_optimizer(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                        scalar_lr: float = 0.5, weight_decay: float = 0.0):
        """MuonAdamW over this model: 2-D block matrices in Muon, everything else in AdamW, with
        the reference's per-group AdamW betas and weight decays (value embeddings at half the
        embedding learning rate; the smear and backout parameters at a fixed SMEAR_LR).

        AdamW learning rates were tuned for a 768-wide model and scale as 1/sqrt(d_model/768).
        In a distributed run (torch.distributed initialised, world > 1) the distributed variant
        is returned, which also averages the gradients across ranks (no DDP wrapper needed)."""
        from nanochat.optim import DistMuonAdamW, MuonAdamW

        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        print0(f"AdamW learning rates scaled by 1/sqrt({self.config.n_embd}/768) = {dmodel_lr_scale:.4f}")
        adamw = dict(kind="adamw", eps=1e-10)
        groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * dmodel_lr_scale, betas=(0.8, 0.96),
                 weight_decay=0.01, **adamw),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * dmodel_lr_scale, betas=(0.8, 0.995),
                 weight_decay=0.001, **adamw),
            dict(params=[self.resid_lambdas], lr=scalar_lr * 0.01, betas=(0.8, 0.95), weight_decay=0.05, **adamw),
            dict(params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0, **adamw),
            dict(kind="muon", params=list(self.transformer.h.parameters()), lr=matrix_lr, momentum=0.95,
                 ns_steps=5, beta2=0.9, weight_decay=weight_decay),
        ]
        if len(self.value_embeds):
            groups.insert(2, dict(params=list(self.value_embeds.parameters()), lr=0.5 * embedding_lr * dmodel_lr_scale,
                                  betas=(0.8, 0.995), weight_decay=0.01, **adamw))
        if self._smear_backout_params():
            groups.insert(-1, dict(params=self._smear_backout_params(), lr=SMEAR_LR, betas=(0.8, 0.95),
                                   weight_decay=0.0, **adamw))
        distributed = get_dist_info()[0]
        return (DistMuonAdamW if distributed else MuonAdamW)(groups)

    @contextlib.contextmanager
    def transposed_weights(self, max_rows: int) -> Iterator[None]:
        """While inside, the linear layers multiply by a contiguous copy of their weight's transpose
        (in the compute dtype), taken on entry, in passes without gradients over the rows that
        their `transposed_rows` name (TRANSPOSED_ROWS_WIDENING). The copies are made only where they
        can pay: on a CPU, for the layers whose range starts at or below `max_rows`, the most rows
        a pass will have; otherwise this does nothing.

        For decoding a few rows on a CPU: MKL multiplies them by a row-major weight's transpose
        (what F.linear asks of it) at a fraction of its speed with the transpose laid out in memory
        (8 rows through a 256 -> 4096 head: 475 us against 202). The copies cost one more copy of
        those matmul weights while they last, and they are not refreshed: the weights must not change
        inside (a generation never changes them; the RL weight sync's broadcasts, which would not
        even move the parameters' version counters, run between generations). Nested use keeps the
        outer copies."""
        on_cpu = self.get_device().type == "cpu"
        linears = [module for module in self.modules() if isinstance(module, Linear) and module.weight_t is None
                   and module.transposed_rows[0] <= max_rows] if on_cpu else []
        try:
            with torch.no_grad():
                for linear in linears:
                    linear.weight_t = cast(linear.weight, COMPUTE_DTYPE).t().contiguous()
            yield
        finally:
            for linear in linears:
                linear.weight_t = None

    def config_dict(self) -> dict:
        return asdict(self.config)

    # ---------------------------------------------------------------- forward

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The normalized token embeddings that enter the first block (and that a KV cache carries
        for the smear: the prefix cache recomputes a row's from its last cached token)."""
        return norm(cast(self.transformer.wte(idx), COMPUTE_DTYPE))

    def _smear(self, x: torch.Tensor, kv_cache, lengths: list[int] | None,
               last_real: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C) with every position's previous-token embedding mixed in through the smear
        gate. Position 0 of a sequence has none. With a KV cache the first new token of a row
        takes the embedding its row's cache carries (when the row already holds tokens), and the
        cache then carries this pass's last embedding (of each row's last real token: `last_real`,
        (rows, positions), when the rows are padded to different lengths)."""
        gate = cast(self.smear_lambda, x.dtype) * torch.sigmoid(self.smear_gate(x[..., :self.smear_gate_channels]))
        first = x[:, :1]
        if kv_cache is not None and max(lengths) > 0:
            previous = kv_cache.prev_embedding
            if min(lengths) == 0:
                # Rows being prefilled from the start sit next to rows that continue.
                previous = previous * (kv_cache.cache_seqlens > 0).to(x.dtype)[:, None]
            first = first + gate[:, :1] * previous[:, None]
        # A decoding step (one new token per row) has no position after the first to smear.
        smeared = torch.cat([first, x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1) if x.size(1) > 1 else first
        if kv_cache is not None:
            kv_cache.prev_embedding.copy_(x[:, -1] if last_real is None else x[last_real])
        return smeared

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None,
                loss_reduction: str = "mean", last_only: bool = False, row_lengths: list[int] | None = None):
        """Logits (B, T, vocab_size) in fp32, or the cross-entropy loss when targets are given
        (target -1 = ignored). With a kv_cache, idx holds the next tokens of every row, each row
        continuing at its own cache position; the cache is advanced by T afterwards.

        last_only=True computes the logits of the last position only, (B, 1, vocab_size): all that
        generation uses after a prefill, and it skips the lm_head for the other T - 1 positions.

        row_lengths (with a kv_cache): rows of different lengths in one pass, each padded at its
        end to T. Row b's tokens are idx[b, :row_lengths[b]]; the logits are those of its last one,
        (B, 1, vocab_size); its cache advances by row_lengths[b] and carries that token's embedding.
        The padding is computed and written past the row's length, where no later query looks
        (decoding writes over it), so the cache must have room for every row's T positions."""
        B, T = idx.shape
        if (last_only or row_lengths is not None) and targets is not None:
            raise ValueError("last_only=True and row_lengths return logits for generation; the loss needs "
                             "every position")
        advance, last_real = T, None  # last_real: (rows, positions) of each row's last token
        if row_lengths is not None:
            if kv_cache is None or len(row_lengths) != B or not all(1 <= length <= T for length in row_lengths):
                raise ValueError(f"row_lengths={row_lengths} needs a kv_cache and one length in 1..{T} per row "
                                 f"of the {B} rows")
            advance = torch.tensor(row_lengths, dtype=kv_cache.cache_seqlens.dtype, device=idx.device)
            last_real = (torch.arange(B, device=idx.device), advance.long() - 1)
        cache_seqlens = None
        lengths = None
        if kv_cache is None:
            if T > self.rotary_len:
                raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.rotary_len})")
            cos, sin = self.rotary_cos[:, :T], self.rotary_sin[:, :T]
        else:
            # One read of the row lengths serves every check and every layer of this pass.
            lengths = kv_cache.cache_seqlens.tolist()
            start, longest = min(lengths), max(lengths) + T
            if longest > kv_cache.max_seq_len:
                raise ValueError(f"KV cache overflow: a row would reach {longest} tokens but the cache holds "
                                 f"{kv_cache.max_seq_len}; allocate a longer cache or generate fewer tokens")
            if longest > self.rotary_len:
                raise ValueError(f"position {longest - 1} exceeds the rotary table ({self.rotary_len})")
            if start + T == longest:
                # Every row at the same position (one prompt, or samples of one prompt): a slice of
                # the rotary tables, and attention told one int, which lets it skip the mask.
                cache_seqlens = start
                cos, sin = self.rotary_cos[:, start:longest], self.rotary_sin[:, start:longest]
            else:
                cache_seqlens = RowPositions(kv_cache.cache_seqlens, lengths)  # shared by every layer
                # index_select on the flattened positions: cheaper than indexing with a (B, T) tensor.
                positions = cache_seqlens.new_token_positions(T).view(-1)
                cos = self.rotary_cos[0].index_select(0, positions).view(B, T, 1, -1)
                sin = self.rotary_sin[0].index_select(0, positions).view(B, T, 1, -1)

        x = self.embed(idx)
        if self.smear_gate is not None:
            x = self._smear(x, kv_cache, lengths, last_real)
        x0 = x
        # Cast and split the per-layer scalars once per pass, not once per layer.
        resid_lambdas = cast(self.resid_lambdas, x.dtype).unbind()
        x0_lambdas = cast(self.x0_lambdas, x.dtype).unbind()
        for i, block in enumerate(self.transformer.h):
            x = resid_lambdas[i] * x + x0_lambdas[i] * x0
            value_embed = self.value_embed_of_layer[i]
            value_embedding = cast(value_embed(idx), x.dtype) if value_embed is not None else None
            x = block(x, value_embedding, cos, sin, self.window_sizes[i], kv_cache, cache_seqlens)
            if i == self.backout_layer and self.backout_lambda is not None:
                x_backout = x
        if self.backout_lambda is not None:
            x = x - cast(self.backout_lambda, x.dtype) * x_backout
        if kv_cache is not None:
            kv_cache.advance(advance)
        if last_only:
            x = x[:, -1:]
        elif last_real is not None:
            x = x[last_real][:, None]
        x = norm(x)

        if targets is not None and loss_reduction != "none" and not (self.lm_head.fp8 and self.training):
            weight = cast(self.lm_head.weight[:self.config.vocab_size], x.dtype)
            return chunked_softcap_cross_entropy(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1),
                                                 LOGIT_SOFTCAP, loss_reduction)
        logits = self.lm_head(x)
        if self.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., :self.config.vocab_size]
        logits = cast(logits, torch.float32)
        logits = soft_cap(logits, LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
