"""The GPU check's --cpu-smoke mode, run as a user runs it (a subprocess), so that the check cannot
rot between the rare runs on a GPU machine: every section runs at tiny sizes on CPU and passes with
real figures, the table and the RESULT lines say so, the JSON report holds them, ray is never
imported (the check must work where Ray is not installed), and the deadline skips sections."""

import json
import subprocess
import sys
from pathlib import Path

from ray_jobs import gpu_check

SECTIONS = ["precision", "attention", "kv_greedy", "decode", "fp8", "lm_loss", "compile", "train_d1", "train_d2"]


def run_check(tmp_path, *args):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "ray_jobs.gpu_check", "--cpu-smoke",
                           "--out", str(out), *args], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    # -X importtime writes one line per module imported, at any time in the run, to stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, imported, report


def test_cpu_smoke_passes_every_check_with_real_figures_and_never_imports_ray(tmp_path):
    proc, imported, report = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torch" in imported and "nanochat.engine" in imported  # the importtime record is there
    assert not {name for name in imported if name == "ray" or name.startswith("ray.")}

    assert report["mode"] == "cpu-smoke" and report["passed"] and report["complete"] and report["skipped"] == []
    checks = {check["name"]: check for check in report["checks"]}
    assert list(checks) == SECTIONS
    assert all(check["passed"] and "error" not in check for check in checks.values())
    figures = {name: check["figures"] for name, check in checks.items()}

    precision = figures["precision"]
    assert precision["activation_dtypes"] == ["float32", "bfloat16"]  # the dtype switch really happened
    # bf16 differs from fp32 (a zero error would mean both passes ran in one dtype), within the tolerances
    assert 0 < precision["loss_rel_error"] <= gpu_check.LOSS_REL_TOL
    assert 0 < precision["grad_rel_error"] <= gpu_check.GRAD_REL_TOL
    assert precision["grad_worst_rel_error"] <= gpu_check.GRAD_WORST_REL_TOL
    assert precision["grads_missing"] == [] and precision["grads_compared"] >= 15

    attention = figures["attention"]
    assert set(attention["kernels_skipped"]) == {"fa3", "fa2"}  # no GPU: SDPA only, and the reasons said
    for case in ("sdpa_causal", "sdpa_sliding"):
        assert all(0 < value <= gpu_check.ATTN_REL_TOL for value in attention[case].values())

    kv = figures["kv_greedy"]
    assert kv["activation_dtypes"] == ["bfloat16"] and kv["cached_tokens"] == kv["tokens"] == 32
    assert kv["identical_tokens"] == 32 or kv["margin_at_divergence"] < gpu_check.TIE_TOL
    assert kv["window"] < kv["prompt_tokens"] + kv["tokens"]  # decoding went past the sliding window
    assert kv["distinct_tokens"] > 3  # a model stuck on one token would prove little
    assert kv["padded_prefill_rel_error"] <= gpu_check.ATTN_REL_TOL

    assert figures["compile"]["loss_rel_error"] <= gpu_check.LOSS_REL_TOL
    assert figures["compile"]["grad_rel_error"] <= gpu_check.GRAD_REL_TOL
    for name in ("train_d1", "train_d2"):
        train = figures[name]
        assert train["timed_steps"] == 3 and train["tokens_per_second"] > 100 and train["mfu"] is None
        assert train["flops_per_token"] > 0 and 0 < train["last_loss"] < 10
    fp8 = figures["fp8"]  # through PyTorch's CPU _scaled_mm: fp8 differs from bf16, within the bounds
    assert 0 < fp8["out_rel_diff_vs_bf16"] <= gpu_check.FP8_OUT_REL_TOL
    assert 0 < fp8["grad_input_rel_diff_vs_bf16"] <= gpu_check.FP8_GRAD_REL_TOL
    assert fp8["fp8_layers"] == 6 * 4 + 1 and 0 < fp8["loss_rel_error"] <= gpu_check.FP8_LOSS_REL_TOL
    lm_loss = figures["lm_loss"]  # 2 chunks against the whole logits tensor: fp32 rounding apart
    assert lm_loss["loss_rel_error"] <= 1e-6 and 0 < lm_loss["grad_weight_rel_error"] <= 1e-5
    decode = figures["decode"]
    assert all(decode[f"tokens_per_second_batch_{batch}"] > 0 for batch in (1, 8, 32))
    assert decode["batch_32_over_batch_1"] >= 2.0

    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("check "))
    assert [line.split()[:2] for line in lines[header + 1:header + 1 + len(SECTIONS)]] == [[n, "PASS"] for n in SECTIONS]
    results = [line for line in lines if line.startswith("RESULT ")]
    assert results == report["results"] and len(results) == 11
    assert all(line.startswith("RESULT gpu_check_") and line.endswith(" PASS") for line in results)


def test_the_deadline_skips_sections_and_says_so(tmp_path):
    proc, _, report = run_check(tmp_path, "--deadline-s", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["checks"] == [] and not report["complete"]
    skipped = [item["section"] for item in report["skipped"]]
    assert skipped == ["precision", "attention", "kv_greedy", "decode", "fp8", "lm_loss", "compile_and_train_d1",
                       "train_d2"]
    assert sum(line.split()[1:2] == ["SKIP"] for line in proc.stdout.splitlines()) == len(skipped)
