"""FP8 training of the linear layers (base_train --fp8): tensorwise dynamic scaling, as nanochat's
`--fp8` (and torchao's float8 "tensorwise" recipe) trains on H100s.

A linear layer's training step takes three matmuls: the output x @ W^T, and in the backward pass
the input's gradient g @ W and the weight's gradient g^T @ x. With fp8 each operand is quantized
just before its matmul, with one scale per tensor computed from the tensor itself:

    scale = FP8_MAX / amax(|t|)          (amax floored, so an all-zero tensor gets a finite scale)
    t_fp8 = clamp(t * scale, -FP8_MAX, FP8_MAX) cast to fp8 (saturating, never wrapping)

and `torch._scaled_mm` multiplies two fp8 tensors on the tensor cores with the inverse scales,
accumulating in fp32 and writing the result in a wider dtype. Activations and weights use
float8_e4m3fn (3 mantissa bits, largest value 448); gradients use float8_e5m2 (2 mantissa bits,
largest 57344), whose range suits their spread. The forward matmul accumulates fast (the
kernel's reduced-precision accumulation), the two backward ones exactly.

The weights stay fp32 master weights and the optimizer never sees fp8: only the matmuls change.
GPT.Linear takes this path when its `fp8` attribute is set (enable_fp8) and the model is in
training mode, so evaluation, sampling and inference keep the compute dtype (nanochat likewise
evaluates in bf16).

fp8 matmuls need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell) and
both dimensions of each operand a multiple of 16; fp8_unavailable_reason says why a device cannot,
and base_train then trains without it (as nanochat ignores --fp8 off CUDA). PyTorch also runs
`_scaled_mm` on CPU, slowly, which is what lets the tests check the arithmetic here against a
float reference without a GPU.
"""

import torch
import torch.nn as nn

ACTIVATION_DTYPE = torch.float8_e4m3fn  # inputs and weights: more mantissa
GRADIENT_DTYPE = torch.float8_e5m2  # gradients: more range
AMAX_FLOOR = 1e-12  # the amax of an all-zero tensor, so that its scale stays finite
MIN_CAPABILITY = (8, 9)  # the first CUDA architecture (Ada) with fp8 tensor cores
MATMUL_MULTIPLE = 16  # _scaled_mm wants every dimension of its operands a multiple of 16
# Layers narrower than this stay in the compute dtype: their matmuls are too small for fp8's speed
# to pay for the quantization passes (nanochat's rule too). In a GPT that leaves the gates out.
MIN_FEATURES = 128


def tensorwise_scale(t: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """The fp32 scalar that maps the largest |value| of `t` onto the largest finite value of
    `fp8_dtype`. The division runs in fp64, so that eager and compiled code round it alike."""
    amax = t.detach().abs().max().double().clamp(min=AMAX_FLOOR)
    return (torch.finfo(fp8_dtype).max / amax).float()


def quantize(t: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t in `fp8_dtype`, the inverse of its scale): t ~= data.float() * inverse_scale."""
    scale = tensorwise_scale(t, fp8_dtype)
    limit = torch.finfo(fp8_dtype).max
    data = (t.detach().float() * scale).clamp(-limit, limit).to(fp8_dtype)
    return data, scale.reciprocal()


def dequantize(data: torch.Tensor, inverse_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values an fp8 tensor and its inverse scale stand for, in `dtype`."""
    return (data.float() * inverse_scale).to(dtype)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column by column, the layout _scaled_mm wants for its second operand
    on CUDA. A transposed contiguous matrix already is; anything else is copied."""
    return t if t.stride(0) == 1 else t.t().contiguous().t()


def scaled_matmul(a: torch.Tensor, a_inverse: torch.Tensor, b: torch.Tensor, b_inverse: torch.Tensor,
                  out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    """(a * a_inverse) @ (b * b_inverse) for fp8 matrices a (M, K) and b (K, N), in `out_dtype`."""
    return torch._scaled_mm(a.contiguous(), _column_major(b), scale_a=a_inverse, scale_b=b_inverse,
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


class Float8Matmul(torch.autograd.Function):
    """x (M, K) @ weight (N, K)^T with all three matmuls of training in fp8. The quantized input
    and weight are what the backward pass keeps (a quarter of the bf16 input's memory is saved
    per layer, the weight's fp8 copy besides)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x_fp8, x_inverse = quantize(x, ACTIVATION_DTYPE)
        w_fp8, w_inverse = quantize(weight, ACTIVATION_DTYPE)
        ctx.save_for_backward(x_fp8, x_inverse, w_fp8, w_inverse)
        ctx.weight_dtype = weight.dtype
        return scaled_matmul(x_fp8, x_inverse, w_fp8.t(), w_inverse, out_dtype=x.dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_fp8, x_inverse, w_fp8, w_inverse = ctx.saved_tensors
        g_fp8, g_inverse = quantize(grad_output, GRADIENT_DTYPE)
        grad_x = scaled_matmul(g_fp8, g_inverse, w_fp8, w_inverse, out_dtype=grad_output.dtype, fast_accum=False)
        # The weight's gradient is written straight in the master weight's dtype (fp32).
        grad_weight = scaled_matmul(g_fp8.t(), g_inverse, x_fp8, x_inverse, out_dtype=ctx.weight_dtype,
                                    fast_accum=False)
        return grad_x, grad_weight


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T through Float8Matmul, in x's dtype."""
    rows = x.reshape(-1, x.size(-1))
    return Float8Matmul.apply(rows, weight).view(*x.shape[:-1], weight.size(0))


def fp8_unavailable_reason(device: torch.device) -> str | None:
    """Why fp8 training cannot run on `device`, or None when it can."""
    if not hasattr(torch, "_scaled_mm"):
        return f"this PyTorch ({torch.__version__}) has no fp8 matmul (torch._scaled_mm)"
    if device.type != "cuda":
        return f"fp8 matmuls need a CUDA GPU (compute capability {'.'.join(map(str, MIN_CAPABILITY))}+), not {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
                f"fp8 tensor cores start at {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper)")
    return None


def fp8_eligible(linear: nn.Linear, min_features: int = MIN_FEATURES) -> bool:
    """Whether a linear layer's matmuls suit fp8: both sizes multiples of 16 and at least `min_features`."""
    sizes = (linear.in_features, linear.out_features)
    return all(size % MATMUL_MULTIPLE == 0 and size >= min_features for size in sizes)


def enable_fp8(model: nn.Module, min_features: int = MIN_FEATURES) -> list[str]:
    """Turn on the fp8 training path of every eligible linear layer of `model` (those with an
    `fp8` attribute, nanochat.gpt.Linear); returns their names. Call it before torch.compile."""
    names = []
    for name, module in model.named_modules():
        if hasattr(module, "fp8") and isinstance(module, nn.Linear) and fp8_eligible(module, min_features):
            module.fp8 = True
            names.append(name)
    return names
