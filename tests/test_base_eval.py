"""Tests of the base-model evaluation job (ray_jobs/base_eval.py) on a tiny saved checkpoint.

A depth-2, width-64 GPT whose every weight is random (tests/tiny.py: the default init's zero
projections and tiny lm_head would make its logits depend on the current token only, and its
answers on the gold labels alone) with a ~300-token tokenizer is saved into the session's base
dir, next to a small eval bundle in the real format and two parquet shards. The job runs through
the session's local Ray: which examples CORE counts right must not depend on how many actors share
the work, and must be those this process gets right; bits per byte and samples must equal what
the same model computes in this process. A Ray of its own with two
*logical* GPUs (scheduling only, no CUDA), one of them held elsewhere, runs in a subprocess: the
actor pool takes the one that is free.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.checkpoint import checkpoint_dir, load_model, save_checkpoint
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import Tokenizer, compute_token_bytes
from nanochat.core_eval import core_score, judge_examples, load_core_tasks
from ray_jobs.base_eval import (SAMPLE_MAX_TOKENS, SAMPLE_PROMPTS, InMemoryModel, evaluate_core_on_actors, main,
                                packed_batches)
from tests.tiny import random_gpt

MODEL_TAG = "base_eval_test_d2"
SENTENCES = [
    "The sun rises in the east and sets in the west.",
    "Cats and dogs are common pets in many homes.",
    "Water boils at one hundred degrees at sea level.",
    "The capital of Italy is Rome, an old city.",
    "Two plus three equals five, and five plus five is ten.",
    "Trees grow slowly but live for a very long time.",
    "The largest ocean on Earth is the Pacific Ocean.",
    "Bread is baked from flour, water, salt and yeast.",
]
CORE_YAML = """\
icl_tasks:
-
  label: tiny_mc
  dataset_uri: tiny/mc.jsonl
  num_fewshot: [1]
  icl_task_type: multiple_choice
  continuation_delimiter: ' '
-
  label: tiny_schema
  dataset_uri: tiny/schema.jsonl
  num_fewshot: [0]
  icl_task_type: schema
  continuation_delimiter: ' '
-
  label: tiny_lm
  dataset_uri: tiny/lm.jsonl
  num_fewshot: [1]
  icl_task_type: language_modeling
  continuation_delimiter: ' '
"""
META_CSV = "Eval Task,Random baseline\ntiny_mc,25\ntiny_schema,50\ntiny_lm,0\n"


def _documents(count):
    """Deterministic documents of 3-8 sentences each."""
    return [" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(3 + i % 6)) for i in range(count)]


def _write_eval_bundle(bundle_dir):
    mc = [{"query": f"Question {i}: the ocean is", "choices": ["Pacific", "dry", "a cat", "bread"],
           "gold": i % 4} for i in range(10)]
    schema = [{"context_options": ["The cat sat", "The sun rose"], "continuation": f"in the east {i}.",
               "gold": i % 2} for i in range(10)]
    lm = [{"context": f"Two plus {i} equals", "continuation": "five"} for i in range(10)]
    os.makedirs(os.path.join(bundle_dir, "eval_data", "tiny"))
    with open(os.path.join(bundle_dir, "core.yaml"), "w") as f:
        f.write(CORE_YAML)
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), "w") as f:
        f.write(META_CSV)
    for name, rows in (("mc", mc), ("schema", schema), ("lm", lm)):
        with open(os.path.join(bundle_dir, "eval_data", "tiny", f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """(shard folder, tokenizer) with the checkpoint and the eval bundle in the session base dir."""
    base = os.environ["NANOCHAT_BASE_DIR"]
    work = tmp_path_factory.mktemp("base_eval")
    tokenizer = Tokenizer.train_from_iterator(iter(_documents(40)), 300)
    tokenizer_dir = work / "tokenizer"
    tokenizer_dir.mkdir()
    tokenizer.save(str(tokenizer_dir))

    model = random_gpt(tokenizer.get_vocab_size(), sequence_len=64)
    save_checkpoint(checkpoint_dir("base", MODEL_TAG), 0, model.state_dict(),
                    {"model_config": dataclasses.asdict(model.config)}, tokenizer_dir=str(tokenizer_dir))

    bundle_dir = os.path.join(base, "eval_bundle")
    if not os.path.exists(bundle_dir):
        _write_eval_bundle(bundle_dir)

    shards = work / "shards"
    shards.mkdir()
    docs = _documents(60)
    for index, part in enumerate((docs[:30], docs[30:])):
        pq.write_table(pa.table({"text": part}), str(shards / f"shard_{index:05d}.parquet"), row_group_size=10)
    return shards, tokenizer


def _core_in_this_process(model, tokenizer, tasks) -> dict:
    """run_core_on_actors' dict, computed here: the examples right per task, their accuracies, CORE."""
    correct = {t.label: [i for i, right in enumerate(judge_examples(model, tokenizer, t.data, "cpu", t.meta)) if right]
               for t in tasks}
    return {**core_score(tasks, {t.label: len(correct[t.label]) / len(t.data) for t in tasks}),
            "correct_examples": correct}


def test_core_is_the_same_on_one_and_two_actors_and_bpb_and_samples_match(ray_local, tiny_setup):
    shards, _ = tiny_setup
    one = main(["--model-tag", MODEL_TAG, "--eval", "core", "--num-actors", "1"])
    two = main(["--model-tag", MODEL_TAG, "--num-actors", "2", "--source", "local", "--data-dir", str(shards),
                "--device-batch-size", "2", "--split-tokens", "384"])
    model, tokenizer, _ = load_model("base", "cpu", model_tag=MODEL_TAG, step=0)
    here = _core_in_this_process(model, tokenizer, load_core_tasks(os.path.join(os.environ["NANOCHAT_BASE_DIR"],
                                                                                 "eval_bundle")))
    # the same examples right, one by one, on 1 and 2 actors and here
    assert one["core"] == two["core"] == here
    assert set(one["core"]["results"]) == {"tiny_mc", "tiny_schema", "tiny_lm"}
    # Guard: the random model gets some examples of the choice tasks right and some wrong (measured:
    # 3 and 5 of 10), so the lists above say which ones. (It continues no text right: tiny_lm is 0.)
    for label in ("tiny_mc", "tiny_schema"):
        assert 0 < len(one["core"]["correct_examples"][label]) < 10, one["core"]
    centered = one["core"]["centered_results"]
    assert one["core"]["core_metric"] == pytest.approx(sum(centered.values()) / 3)
    assert centered["tiny_mc"] == pytest.approx((one["core"]["results"]["tiny_mc"] - 0.25) / 0.75)

    # bits per byte and samples as this process computes them with the same checkpoint
    token_bytes = compute_token_bytes(tokenizer)
    for split, shard in (("train", "shard_00000.parquet"), ("val", "shard_00001.parquet")):
        # 384 tokens = 3 batches of 2 rows of 64
        expected = evaluate_bpb(model, packed_batches(str(shards / shard), tokenizer, 2, 64), 3, token_bytes)
        assert two["bpb"][split] == pytest.approx(expected, rel=1e-5)
    engine = Engine(model, tokenizer)
    for sample, prompt in zip(two["samples"], SAMPLE_PROMPTS):
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        sequences, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=SAMPLE_MAX_TOKENS, temperature=0)
        assert sample == {"prompt": prompt, "completion": tokenizer.decode(sequences[0][len(tokens):])}

    with open(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "base_eval", f"{MODEL_TAG}_0.json")) as f:
        assert json.load(f) == two


def test_core_on_actors_of_an_in_memory_model_equals_core_in_this_process(ray_local, tiny_setup):
    # What base_train does for --core-metric-every: hand over weights, not a checkpoint.
    model, tokenizer, meta = load_model("base", "cpu", model_tag=MODEL_TAG, step=0)
    tasks = load_core_tasks(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "eval_bundle"))
    weights = InMemoryModel(meta["model_config"], model.state_dict(), tokenizer)
    assert evaluate_core_on_actors(weights, tasks, num_actors=1) == _core_in_this_process(model, tokenizer, tasks)


HELD_GPU_CHECKS = textwrap.dedent("""
    import json, sys
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from nanochat.core_eval import load_core_tasks
    from ray_jobs import gpus
    from ray_jobs.base_eval import CheckpointModel, eval_actors, run_core_on_actors

    gpus.POOL_TRY_WAIT_S = 2.0
    ray.init(address="local", num_cpus=3, num_gpus=2, include_dashboard=False, log_to_driver=False)
    tasks = load_core_tasks(sys.argv[1])
    source = CheckpointModel("base", sys.argv[2], 0)
    held = placement_group([{"GPU": 1}])  # Serve or another job holds one GPU
    assert held.wait(timeout_seconds=30)
    with eval_actors(source, tasks, num_actors=2, use_gpu="on", gpu_wait_s=10) as actors:
        print("pool", len(actors), "devices", ray.get([actor.ready.remote() for actor in actors]))
        print("core", json.dumps(run_core_on_actors(actors, tasks)))
    gpus.reserve_gpus([{"GPU": 1}], timeout_s=10, what="after_the_pool")  # the pool gave its GPU back
    print("the pool's GPU is free again")
    try:
        with eval_actors(source, tasks, num_actors=1, num_gpus_per_actor=2, gpu_wait_s=2):
            print("a pool of 2-GPU actors started")
    except gpus.GPUsUnavailableError as exc:
        print("refused:", exc)
    remove_placement_group(held)
""")


def test_a_gpu_pool_takes_the_gpus_that_are_free_and_scores_the_same(ray_local, tiny_setup):
    model, tokenizer, _ = load_model("base", "cpu", model_tag=MODEL_TAG, step=0)
    bundle_dir = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "eval_bundle")
    expected = _core_in_this_process(model, tokenizer, load_core_tasks(bundle_dir))
    run = subprocess.run([sys.executable, "-c", HELD_GPU_CHECKS, bundle_dir, MODEL_TAG], capture_output=True,
                         text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = run.stdout
    assert run.returncode == 0, run.stderr[-3000:]
    # two actors asked for, one GPU free: one actor, on the CPU since logical GPUs have no CUDA
    assert "pool 1 devices ['cpu']" in out
    assert "base_eval: 1 of the 2 actor(s) asked for are ready (1 could be placed)" in out
    core = json.loads(next(line for line in out.splitlines() if line.startswith("core "))[len("core "):])
    assert core == expected
    assert "the pool's GPU is free again" in out
    refusal = next(line for line in out.splitlines() if line.startswith("refused:"))
    assert "base_eval asked for 2 GPU(s) (1 actor(s))" in refusal
    assert "within 2 s: it has 2 GPU(s) now" in refusal and "--use-gpu off" in refusal


def test_packed_batches_are_full_rows_that_start_with_bos(tiny_setup):
    shards, tokenizer = tiny_setup
    batches = list(packed_batches(str(shards / "shard_00000.parquet"), tokenizer, 2, 64))
    assert batches
    for x, y in batches:
        assert x.shape == y.shape == (2, 64)
        assert (x[:, 0] == tokenizer.get_bos_token_id()).all()
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_missing_checkpoint_says_how_to_make_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model-tag", "no_such_model", "--eval", "core"])
    assert exit_info.value.code == 1
    assert "python -m ray_jobs.base_train" in capsys.readouterr().err


def test_unknown_eval_mode_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--eval", "core,perplexity"])
    assert exit_info.value.code == 2
    assert "perplexity" in capsys.readouterr().err
