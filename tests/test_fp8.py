"""nanochat.fp8 on CPU, against float references: PyTorch converts the float8 dtypes and runs
torch._scaled_mm on CPU, so the scaling, the casts, the matmuls and the gradient path of the
autograd function are the code a GPU runs, at sizes that take milliseconds."""

import pytest
import torch

from nanochat import fp8
from nanochat.gpt import GPT, config_from_depth
from ray_jobs.base_train import fp8_setup

E4M3_MAX, E5M2_MAX = 448.0, 57344.0
# Half a unit in the last place, relative, of a normal fp8 value: 3 mantissa bits for e4m3, 2 for e5m2.
HALF_ULP = {fp8.ACTIVATION_DTYPE: 2.0 ** -4, fp8.GRADIENT_DTYPE: 2.0 ** -3}
# Half the spacing of the subnormals (the absolute error floor, in scaled units).
SUBNORMAL_HALF_STEP = {fp8.ACTIVATION_DTYPE: 2.0 ** -10, fp8.GRADIENT_DTYPE: 2.0 ** -17}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().float(), reference.detach().float()
    return float((value - reference).norm() / reference.norm())


def test_the_scale_maps_the_largest_magnitude_onto_the_format_maximum():
    t = torch.tensor([[0.5, -3.0], [2.0, 1.0]])
    assert float(fp8.tensorwise_scale(t, fp8.ACTIVATION_DTYPE)) == pytest.approx(E4M3_MAX / 3.0)
    assert float(fp8.tensorwise_scale(t, fp8.GRADIENT_DTYPE)) == pytest.approx(E5M2_MAX / 3.0)
    data, inverse = fp8.quantize(t, fp8.ACTIVATION_DTYPE)
    assert data.dtype == torch.float8_e4m3fn and float(data[0, 1]) == -E4M3_MAX  # saturated, never NaN
    assert float(inverse) == pytest.approx(3.0 / E4M3_MAX)
    zeros, inverse = fp8.quantize(torch.zeros(4, 4), fp8.ACTIVATION_DTYPE)  # amax 0: a finite scale
    assert torch.isfinite(inverse) and not zeros.float().any()


@pytest.mark.parametrize("dtype", [fp8.ACTIVATION_DTYPE, fp8.GRADIENT_DTYPE])
def test_a_round_trip_stays_within_half_an_ulp_of_every_value(dtype):
    torch.manual_seed(0)
    t = torch.randn(256, 128) * torch.logspace(-3, 1, 128)  # columns spanning four decades
    data, inverse = fp8.quantize(t, dtype)
    back = fp8.dequantize(data, inverse)
    assert data.dtype == dtype and torch.isfinite(back).all()
    bound = torch.maximum(HALF_ULP[dtype] * t.abs(), SUBNORMAL_HALF_STEP[dtype] * inverse)
    assert ((back - t).abs() <= bound * (1 + 1e-6)).all()
    # and it is a real rounding: about a third of the bound on average, not exact
    assert 0.5 * HALF_ULP[dtype] / 4 < relative_error(back, t) < HALF_ULP[dtype]


def test_the_autograd_function_is_the_matmuls_of_the_quantized_operands():
    torch.manual_seed(1)
    x = torch.randn(64, 128, requires_grad=True)
    weight = torch.randn(96, 128, requires_grad=True)
    grad_output = torch.randn(64, 96)
    out = fp8.Float8Matmul.apply(x, weight)
    out.backward(grad_output)

    # Exactly (up to fp32 summation order) the float matmuls of what the fp8 tensors stand for.
    xq = fp8.dequantize(*fp8.quantize(x, fp8.ACTIVATION_DTYPE))
    wq = fp8.dequantize(*fp8.quantize(weight, fp8.ACTIVATION_DTYPE))
    gq = fp8.dequantize(*fp8.quantize(grad_output, fp8.GRADIENT_DTYPE))
    assert out.shape == (64, 96) and weight.grad.dtype == torch.float32
    assert relative_error(out, xq @ wq.t()) < 1e-5
    assert relative_error(x.grad, gq @ wq) < 1e-5
    assert relative_error(weight.grad, gq.t() @ xq) < 1e-5

    # Against the exact linear layer: the error of fp8 rounding, a few percent, never zero.
    exact = x.detach() @ weight.detach().t()
    assert 0.01 < relative_error(out, exact) < 0.08
    assert 0.01 < relative_error(x.grad, grad_output @ weight.detach()) < 0.15
    assert 0.01 < relative_error(weight.grad, grad_output.t() @ x.detach()) < 0.15


def test_only_layers_of_at_least_128_in_multiples_of_16_are_eligible():
    assert fp8.fp8_eligible(torch.nn.Linear(128, 256)) and fp8.fp8_eligible(torch.nn.Linear(1536, 6144))
    assert not fp8.fp8_eligible(torch.nn.Linear(128, 64))  # too narrow to pay for its quantization
    assert not fp8.fp8_eligible(torch.nn.Linear(136, 256))  # not a multiple of 16: _scaled_mm refuses it
    assert fp8.fp8_eligible(torch.nn.Linear(32, 64), min_features=32)


def test_a_gpt_trains_through_fp8_and_evaluates_without_it():
    torch.manual_seed(2)
    config = config_from_depth(2, aspect_ratio=64, head_dim=32, sequence_len=32, vocab_size=256)
    model = GPT(config)
    model.init_weights()
    for block in model.transformer.h:  # the output projections start at zero: give them weights
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.c_fc.weight, std=0.02)
    x, y = torch.randint(0, 256, (2, 2, 32)).unbind(0)
    exact_loss = model(x, y)
    exact_loss.backward()
    exact_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    layers = fp8.enable_fp8(model)
    # 128 wide: the attention and MLP matrices and the lm_head; not the gates (12 and 24 inputs)
    assert len(layers) == 2 * 6 + 1 and "lm_head" in layers and not any("gate" in name for name in layers)
    loss = model(x, y)
    loss.backward()
    assert loss.item() != exact_loss.item() and abs(loss.item() / exact_loss.item() - 1) < 0.02
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert set(grads) == set(exact_grads)
    assert relative_error(torch.cat([g.flatten() for g in grads.values()]),
                          torch.cat([g.flatten() for g in exact_grads.values()])) < 0.1
    model.eval()  # evaluation runs the compute dtype: the exact loss again
    with torch.no_grad():
        assert model(x, y).item() == exact_loss.item()


def test_fp8_is_refused_with_the_reason_where_the_device_lacks_it(monkeypatch):
    assert "need a CUDA GPU" in fp8.fp8_unavailable_reason(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert "A100 has compute capability 8.0" in fp8.fp8_unavailable_reason(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert fp8.fp8_unavailable_reason(torch.device("cuda", 0)) is None

    # base_train on such a device: the model is left as it was, and the history says why
    model = GPT(config_from_depth(2, aspect_ratio=64, head_dim=32, sequence_len=32, vocab_size=256))
    record = fp8_setup(model, torch.device("cpu"))
    assert record["fp8_layers"] == 0 and "need a CUDA GPU" in record["fp8_unavailable"]
    assert not any(getattr(module, "fp8", False) for module in model.modules())
