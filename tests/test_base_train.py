"""Tests of pretraining on Ray Train (ray_jobs/base_train.py), end to end through `main()`.

A depth-2, width-64 GPT with a ~450-token tokenizer trains on small synthetic parquet shards
through the session's local Ray (2 CPUs). A Ray Train run costs seconds of start-up, so three
module-scoped runs (four `main()` calls) serve all the checks:

    two_workers  2 workers, 8 steps, checkpoints at 4 and 8, val bpb at 0 and 8, CORE at 8
    recovered    1 worker, the same global batch (2 micro-batches), the default --compile auto
                 (compiled where a C++ compiler is installed); the worker dies at the start of
                 step 6 and FailureConfig restarts it from the step-4 checkpoint
    resumed      2 workers; a worker dies at step 6 with no restarts allowed, so the run stops
                 (its newest checkpoint is step 4); then `--resume` finishes it

Checkpoint choice on resume (ray_jobs.train_common: latest_run_checkpoint, restore_from_checkpoint)
is tested without Ray Train, on run folders built with save_checkpoint as three ranks write them.

Why the runs cannot agree exactly: each worker reads its own lane of the stream (the read units
dealt round-robin, each lane packed on its own), so 1 and 2 workers put different rows into a
step's global batch; and a restarted or resumed stream starts again at the beginning of the
shard of the slowest worker when the checkpoint was taken (see ray_jobs.pretrain_data), so it
trains on some rows twice. Each tolerance below says how much that
can move the number it checks, and what a broken run would do instead.

Where the data stood is checked exactly: the stream is deterministic, so the rows each worker read
are rebuilt in this process from the stream's own parts, and a restore must record the slowest
worker's shard, start the stream there (the first rows it trains are checked by a checksum) and
train at most a shard's documents per worker a second time.
"""

import json
import math
import os
import random
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

import ray.train
import torch

from nanochat.checkpoint import find_last_step, load_checkpoint, load_model, save_checkpoint
from nanochat.core_eval import core_score, evaluate_task, load_core_tasks
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import Tokenizer, compute_token_bytes, get_tokenizer_dir
from nanochat.gpt import GPT, GPTConfig
from ray_jobs import pretrain_data, train_common
from ray_jobs.base_eval import CheckpointModel, evaluate_core_on_actors
from ray_jobs.base_train import main, parse_args, rows_checksum, validation_rows, worker_val_batches
from ray_jobs.train_common import latest_run_checkpoint, restore_from_checkpoint

STEPS = 8
SAVE_EVERY = 4
# A worker dies at the start of step 6, two steps after step 4's checkpoint: too soon for Ray
# Train's controller to have taken that report for sure, so the restarted workers must find the
# checkpoint in storage themselves (train_common.restore_from_checkpoint).
FAIL_AT = SAVE_EVERY + 2
SEQ_LEN = 64
DEVICE_BATCH = 4
EVAL_TOKENS = 2048
PACK_BUFFER_DOCS = 16

SUBJECTS = ["the cat", "a small dog", "the old man", "my sister", "the teacher", "a young bird", "the farmer",
            "our neighbour", "the captain", "a tired student"]
VERBS = ["sees", "likes", "finds", "carries", "paints", "follows", "feeds", "watches", "helps", "calls"]
OBJECTS = ["the red ball", "a green apple", "the river", "an old book", "the white house", "a long road",
           "the blue sea", "a warm coat", "the tall tree", "a quiet garden"]
PLACES = ["in the morning", "at night", "near the school", "after lunch", "in the rain", "on the hill"]

CORE_YAML = """\
icl_tasks:
-
  label: tiny_mc
  dataset_uri: tiny/mc.jsonl
  num_fewshot: [1]
  icl_task_type: multiple_choice
  continuation_delimiter: ' '
-
  label: tiny_lm
  dataset_uri: tiny/lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
  continuation_delimiter: ' '
"""


def _documents(count: int, seed: int) -> list[str]:
    """Sentences from a small grammar: learnable in a few steps, varied enough that different
    rows give different losses."""
    rng = random.Random(seed)
    return [" ".join(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                     f"{rng.choice(PLACES)}." for _ in range(rng.randint(2, 8))) for _ in range(count)]


def _write_core_bundle(bundle_dir: str) -> None:
    mc = [{"query": f"{SUBJECTS[i].capitalize()} {VERBS[i]}", "choices": [OBJECTS[i], "zzz", "qqq", "xxx"],
           "gold": 0} for i in range(8)]
    lm = [{"context": f"{SUBJECTS[i].capitalize()} {VERBS[i]}", "continuation": OBJECTS[i]} for i in range(8)]
    os.makedirs(os.path.join(bundle_dir, "eval_data", "tiny"))
    with open(os.path.join(bundle_dir, "core.yaml"), "w") as f:
        f.write(CORE_YAML)
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Random baseline\ntiny_mc,25\ntiny_lm,0\n")
    for name, rows in (("mc", mc), ("lm", lm)):
        with open(os.path.join(bundle_dir, "eval_data", "tiny", f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def write_pretraining_inputs(shards) -> None:
    """Into the folder `shards`: 12 train shards of 30 documents (about 20 rows of 65 tokens each),
    then the val shard of 60 (about 40 rows, of which 32 are evaluated); a 512-token tokenizer
    trained on the grammar into the session's base dir; the tiny CORE bundle there, unless it is
    there already."""
    shards.mkdir()
    for index in range(13):
        documents = _documents(60 if index == 12 else 30, seed=index)
        pq.write_table(pa.table({"text": documents}), str(shards / f"shard_{index:05d}.parquet"))
    Tokenizer.train_from_iterator(iter(_documents(300, seed=100)), 512).save(get_tokenizer_dir())
    bundle = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "eval_bundle")
    if not os.path.exists(bundle):
        _write_core_bundle(bundle)


def pretraining_flags(shards, runs) -> list[str]:
    """base_train's flags for a tiny model on write_pretraining_inputs' shards: STEPS steps, val bpb
    at 0 and STEPS, checkpoints every SAVE_EVERY steps into the folder `runs`."""
    return ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", str(SEQ_LEN),
            "--window-pattern", "L", "--device-batch-size", str(DEVICE_BATCH), "--total-batch-size", "512",
            "--num-iterations", str(STEPS), "--source", "local", "--data-dir", str(shards),
            "--pack-buffer-docs", str(PACK_BUFFER_DOCS), "--eval-every", str(STEPS), "--eval-tokens", str(EVAL_TOKENS),
            "--sample-every", "-1", "--save-every", str(SAVE_EVERY), "--storage-path", str(runs),
            "--compile", "off",  # 8 steps: compiling costs more than it saves (the 1-worker run compiles)
            # sqrt(512 / 2**19) scales the default learning rates by 1/32: too small to move in 8
            # steps. These are 8x the seed's (0.02, 0.2, 0.004, 0.5), without the 40-step warmup.
            "--matrix-lr", "0.16", "--embedding-lr", "1.6", "--unembedding-lr", "0.032", "--scalar-lr", "4",
            "--warmup-steps", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Shards, the tokenizer under the session's base dir, a tiny CORE bundle, the common flags."""
    work = tmp_path_factory.mktemp("base_train")
    shards = work / "shards"
    write_pretraining_inputs(shards)
    return {"work": work, "shards": shards, "flags": pretraining_flags(shards, work / "runs")}


@pytest.fixture(scope="module")
def two_workers(ray_local, setup):
    return main(setup["flags"] + ["--num-workers", "2", "--run-name", "two_workers", "--model-tag", "bt_two",
                                  "--core-metric-every", str(STEPS), "--core-metric-max-per-task", "8"])


@pytest.fixture(scope="module")
def recovered(ray_local, setup):
    return main(setup["flags"] + ["--num-workers", "1", "--run-name", "recovered", "--model-tag", "bt_recovered",
                                  "--fail-at-step", str(FAIL_AT), "--max-failures", "1", "--compile", "auto"])


@pytest.fixture(scope="module")
def resumed(ray_local, setup):
    # with the gpt2 preset's bf16 embedding tables (their AdamW state goes through the checkpoint
    # too), and its --fp8, which a CPU worker declines with the reason
    flags = setup["flags"] + ["--num-workers", "2", "--run-name", "resumed", "--model-tag", "bt_resumed",
                              "--embedding-dtype", "bfloat16", "--fp8"]
    with pytest.raises(SystemExit) as stopped:
        main(flags + ["--fail-at-step", str(FAIL_AT), "--max-failures", "0"])
    assert stopped.value.code == 1
    return main(flags + ["--resume"])


def _losses(history: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in history if "loss" in r}


def _val_bpb(history: list[dict]) -> dict[int, float]:
    return {r["step"]: r["val_bpb"] for r in history if "val_bpb" in r}


def _val_rows(setup: dict, batch_size: int, num_batches: int):
    val_shard = str(sorted(setup["shards"].iterdir())[-1])
    return validation_rows([val_shard], get_tokenizer_dir(), batch_size, SEQ_LEN, num_batches)


def test_two_workers_train_and_the_loss_falls(two_workers):
    history = two_workers["history"]
    losses = _losses(history)
    assert sorted(losses) == list(range(1, STEPS + 1))
    # The first step sees the initial weights, whose near-zero lm_head predicts a uniform
    # distribution: the loss is ln(vocab) to a few thousandths.
    vocab = two_workers["config"]["model_config"]["vocab_size"]
    assert losses[1] == pytest.approx(math.log(vocab), abs=0.01)
    # the grammar has few words: 8 steps take more than a nat off (measured: 1.6)
    assert losses[STEPS] < losses[1] - 1.0
    val = _val_bpb(history)
    assert set(val) == {0, STEPS} and val[STEPS] < val[0] - 0.3
    assert two_workers["val_bpb"] == val[STEPS]
    assert 0 < two_workers["val_unigram_bpb"] < val[0]  # word frequencies beat the untrained model
    steps = [r for r in history if "loss" in r]
    assert all(r["tokens_per_second"] > 0 and 0 <= r["data_wait_seconds"] < r["step_seconds"] for r in steps)


def test_one_and_two_workers_agree_over_the_first_steps(two_workers, recovered):
    # The 1-worker run's steps 1-4 come before its worker died. Both runs start from the same
    # weights with the same global batch size and schedule; only the rows in a step's batch
    # differ (Ray Data deals the stream to the workers in blocks). Tolerances:
    # - step 1 is computed on the initial weights, whose near-zero lm_head predicts a uniform
    #   distribution on any rows: the loss is ln(vocab) to ~1e-3 (measured spread: 1e-3);
    # - steps 2-4: 0.04 nats, 4 standard deviations of the step-4 loss between runs that share
    #   no rows at all (0.010, measured with a plain loop on this config and data over 5 disjoint
    #   row sets; runs that deal the same rows differently spread less, 0.003). A learning rate
    #   off by 2x, e.g. scaled with the number of workers, moves the step-4 loss by 0.3-0.65.
    one, two = _losses(recovered["history"]), _losses(two_workers["history"])
    assert one[1] == pytest.approx(two[1], abs=0.005)
    for step in range(2, SAVE_EVERY + 1):
        assert one[step] == pytest.approx(two[step], abs=0.04), (step, one, two)
    assert two[1] - two[SAVE_EVERY] > 0.3  # the compared steps do move


def test_killed_worker_is_replaced_and_the_run_completes(recovered, two_workers):
    history = recovered["history"]
    restores = [r for r in history if r.get("restored_from_checkpoint")]
    assert [r["step"] for r in restores] == [SAVE_EVERY]
    assert sorted(_losses(history)) == list(range(1, STEPS + 1))
    assert find_last_step(recovered["checkpoint_dir"]) == STEPS
    # it learned as much as the uninterrupted 2-worker run (the resume test explains the 3%)
    assert _val_bpb(history)[STEPS] == pytest.approx(_val_bpb(two_workers["history"])[STEPS], rel=0.03)


def _lane_rows(setup: dict, start_file: int, lane: int, num_lanes: int) -> list[tuple[np.ndarray, int]]:
    """(row, shard label) of lane `lane` of the train stream started at shard `start_file`, in
    order, rebuilt in this process from the stream's own parts (read units, tokenizing, packer):
    the stream is deterministic, so these are the rows base_train's workers read."""
    train_files = sorted(str(path) for path in setup["shards"].iterdir())[:-1]
    rotated = train_files[start_file:] + train_files[:start_file]
    indices = [(start_file + i) % len(train_files) for i in range(len(train_files))]
    source = pretrain_data.ParquetRowGroupDatasource(rotated, indices, lane=lane, num_lanes=num_lanes)
    packer = pretrain_data.PackRows(SEQ_LEN, Tokenizer.from_directory(get_tokenizer_dir()).get_bos_token_id(),
                                    PACK_BUFFER_DOCS, source.num_documents, 0, pretrain_data.PACK_GROUP_DOCS,
                                    start_file)
    rows = []
    for path, row_groups, file_index, _, _ in source.units:
        for table in pretrain_data.read_row_groups(path, row_groups, file_index):
            packed = packer(pretrain_data.tokenize_documents(table, get_tokenizer_dir()))
            rows += zip(packed.column("tokens").to_numpy(), packed.column("file_index").to_pylist())
    return rows


def _documents_in(rows) -> list[np.ndarray]:
    """The documents (or their cropped heads) in packed rows: the pieces that start at a BOS, those
    of at least 16 tokens (shorter ones could be the heads of two documents)."""
    bos = Tokenizer.from_directory(get_tokenizer_dir()).get_bos_token_id()
    pieces = []
    for row in rows:
        starts = list(np.flatnonzero(row == bos)) + [len(row)]
        pieces += [row[a:b] for a, b in zip(starts, starts[1:]) if b - a >= 16]
    return pieces


def _same_document(a: np.ndarray, b: np.ndarray) -> bool:
    length = min(len(a), len(b))  # a cropped document is a head of the whole one
    return bool((a[:length] == b[:length]).all())


@pytest.mark.parametrize("run, num_workers", [("recovered", 1), ("resumed", 2)])
def test_restored_stream_starts_at_the_slowest_workers_shard_and_repeats_at_most_a_shard(run, num_workers, setup,
                                                                                        request):
    # Ray Train restarts the worker group after the injected death (recovered), and --resume
    # starts a new one (resumed): either way the step-4 checkpoint must record the slowest
    # worker's place in the stream, and the stream must start again there (README: "about one
    # shard per worker is seen again"). Each lane is rebuilt here to know what the workers read.
    history = request.getfixturevalue(run)["history"]
    [restore] = [r for r in history if r.get("restored_from_checkpoint")]
    micro_batches = 512 // (num_workers * DEVICE_BATCH * SEQ_LEN)
    trained_rows = SAVE_EVERY * micro_batches * DEVICE_BATCH  # per lane, before the checkpoint
    lanes = [_lane_rows(setup, 0, lane, num_workers) for lane in range(num_workers)]
    # When step 4 was saved, each worker held the next batch; its place is that batch's newest
    # shard. Rows are labelled with the shard of the newest document read when they were packed,
    # and the packer takes documents in groups of 128 (4-5 shards of 30), so the lanes stand at
    # shards 4 (one lane) and 8 and 9 (two lanes: shards are dealt to them in turn): a checkpoint
    # at the fastest worker's shard (9), or a stream restarted at shard 0, differs from the slowest's.
    places = [max(label for _, label in lane[trained_rows:trained_rows + DEVICE_BATCH]) for lane in lanes]
    assert min(places) >= 4 and (num_workers == 1 or max(places) > min(places)), places
    assert restore["data_position"] == {"epoch": 0, "file_index": min(places)}
    # The first rows trained after the restore are the first rows of the lanes started at that shard
    # (no row of it skipped): the stream restarted there, not at shard 0.
    start = restore["data_position"]["file_index"]
    restarted = [_lane_rows(setup, start, lane, num_workers) for lane in range(num_workers)]
    first_rows = [np.stack([row for row, _ in lane[:DEVICE_BATCH]]) for lane in restarted]
    assert restore["first_rows_checksum"] == sum(rows_checksum(torch.from_numpy(rows)) for rows in first_rows)
    assert restore["stream_start"] == start and restore["skipped_rows"] == 0
    # Documents trained before the checkpoint and again after it: at most one shard's (30) per
    # worker. Measured: none with one worker, 19 of 32 with two (their restarted lanes reach the
    # shards before the checkpoint's within the packer's first group of 128 documents); a stream
    # restarted at shard 0 would train all 34 of one worker's again.
    trained_after = (STEPS - SAVE_EVERY) * micro_batches * DEVICE_BATCH
    before = _documents_in(row for lane in lanes for row, _ in lane[:trained_rows])
    after = _documents_in(row for lane in restarted for row, _ in lane[:trained_after])
    repeated = sum(any(_same_document(a, b) for b in before) for a in after)
    assert repeated <= 30 * num_workers, repeated
    # one node: one rank hashed the model file for all of them
    assert restore["model_verifications"] == 1


def test_stopped_run_resumes_to_the_loss_of_an_uninterrupted_run(resumed, two_workers):
    history = resumed["history"]
    assert [r["step"] for r in history if r.get("restored_from_checkpoint")] == [SAVE_EVERY]
    assert sorted(_losses(history)) == list(range(1, STEPS + 1))
    assert find_last_step(resumed["checkpoint_dir"]) == STEPS
    # Val bpb is measured on fixed rows, so it carries no evaluation noise: what differs is the
    # rows the two runs trained on (dealt differently between the workers, and the resumed
    # stream repeats what its checkpoint's shard had already given). Measured with a plain loop
    # on this config and data: runs on entirely different rows end within 1.6% of each other and
    # a correct resume that repeats a shard within 0.1%, while a resume that restarts the LR
    # schedule ends 6% away and one that loses the weights 27%. Tolerance: 3%. (Losing the
    # optimizer state moves it by only 0.7% here; tests/test_optim.py checks that round trip.)
    assert _val_bpb(history)[STEPS] == pytest.approx(_val_bpb(two_workers["history"])[STEPS], rel=0.03)
    starts = [r for r in history if "worker_nodes" in r]
    assert len(starts) == 2 and all(r["fp8_layers"] == 0 and "need a CUDA GPU" in r["fp8_unavailable"] for r in starts)
    state, _, _ = load_checkpoint(resumed["checkpoint_dir"], STEPS, "cpu")
    assert state["transformer.wte.weight"].dtype == torch.bfloat16
    assert state["lm_head.weight"].dtype == torch.float32


def test_checkpoint_loads_and_gives_the_trainers_val_bpb_and_core(two_workers, setup):
    model, tokenizer, meta = load_model("base", "cpu", model_tag="bt_two")
    assert meta["step"] == STEPS and meta["val_bpb"] == two_workers["val_bpb"]
    per_worker = two_workers["config"]["val_batches_per_worker"]
    assert per_worker == EVAL_TOKENS // (2 * DEVICE_BATCH * SEQ_LEN)
    rows = _val_rows(setup, DEVICE_BATCH, 2 * per_worker)
    batches = worker_val_batches(rows, DEVICE_BATCH, 0, 1, "cpu")
    bpb = evaluate_bpb(model, batches, len(batches), compute_token_bytes(tokenizer))
    # the same rows and weights; only the order of the fp32 sums differs (two ranks, then summed)
    assert bpb == pytest.approx(two_workers["val_bpb"], rel=1e-5)

    # CORE was scored on the two training ranks (each half of every task's examples, counts summed);
    # it must equal CORE scored in one process and on base_eval's pool of CPU actors
    tasks = load_core_tasks(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "eval_bundle"), 8)
    expected = core_score(tasks, {t.label: evaluate_task(model, tokenizer, t.data, "cpu", t.meta) for t in tasks})
    on_actors = evaluate_core_on_actors(CheckpointModel("base", "bt_two", STEPS), tasks, num_actors=2,
                                        num_gpus_per_actor=0)
    assert on_actors["core_metric"] == pytest.approx(expected["core_metric"], abs=1e-9)
    core = [r["core_metric"] for r in two_workers["history"] if "core_metric" in r]
    assert core == [pytest.approx(expected["core_metric"], abs=1e-9)]


def test_a_run_with_checkpoints_needs_resume(two_workers, setup, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(setup["flags"] + ["--num-workers", "2", "--run-name", "two_workers"])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert "already has checkpoints" in message and "--resume" in message


def test_a_batch_that_does_not_divide_says_how_to_fix_it(ray_local, setup, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(setup["flags"] + ["--num-workers", "2", "--total-batch-size", "500", "--run-name", "bad_batch"])
    assert exit_info.value.code == 1
    assert "--total-batch-size or --device-batch-size" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--depth", "0"], "--depth must be at least 1"),
    (["--warmdown-ratio", "1.5"], "--warmdown-ratio must lie in [0, 1]"),
    (["--core-metric-max-per-task", "0"], "--core-metric-max-per-task must be a positive number"),
    (["--max-failures", "-1"], "--max-failures must be 0 or more"),
])
def test_bad_flags_are_refused_with_the_reason(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


RESUME_CONFIG = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


def tiny_model_and_optimizer(seed: int) -> tuple[GPT, object]:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(RESUME_CONFIG)
    model.to_empty(device="cpu")
    model.init_weights()
    return model, model.setup_optimizer()


def save_run_steps(run_dir, steps) -> dict[int, GPT]:
    """Checkpoint folders step_<step> of a run as the Checkpointer leaves them in storage:
    the files of three ranks merged; each step's model has its own weights. Returns them by step."""
    models = {}
    for step in steps:
        model, optimizer = tiny_model_and_optimizer(seed=step)
        folder = str(run_dir / f"step_{step:06d}")
        for rank in (2, 1):
            save_checkpoint(folder, step, None, None, optimizer_state=optimizer.state_dict(), rank=rank, world_size=3)
        save_checkpoint(folder, step, model.state_dict(), {"model_config": model.config_dict(), "history": [step]},
                        optimizer_state=optimizer.state_dict(), world_size=3)
        models[step] = model
    return models


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_resume_skips_a_step_whose_shard_is_missing_or_cut_short(tmp_path, damage, capsys):
    run_dir = tmp_path / "storage" / "run_a"
    save_run_steps(run_dir, (2, 4))
    shard = run_dir / "step_000004" / "optim_000004_rank2.pt"
    if damage == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])

    path, meta = latest_run_checkpoint(str(tmp_path / "storage"), "run_a")
    assert path == str(run_dir / "step_000002")
    assert meta["step"] == 2 and meta["history"] == [2]
    warning = capsys.readouterr().out
    assert "skipping incomplete checkpoint step_000004" in warning
    assert (f"{run_dir}/step_000004/optim_000004_rank2.pt is missing" if damage == "deleted"
            else "optim_000004_rank2.pt has 100 bytes") in warning
    # Through a URI, as for s3:// storage: the same choice, named by URI.
    uri_path, _ = latest_run_checkpoint(f"file://{tmp_path / 'storage'}", "run_a")
    assert uri_path == f"file://{tmp_path / 'storage'}/run_a/step_000002"

    (run_dir / "step_000002" / "meta_000002.json").unlink()
    assert latest_run_checkpoint(str(tmp_path / "storage"), "run_a") is None


def test_restore_falls_back_from_an_incomplete_registered_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "storage" / "run_b"
    models = save_run_steps(run_dir, (2, 4, 6))
    (run_dir / "step_000006" / "optim_000006_rank1.pt").unlink()  # an upload cut short
    (run_dir / "step_000004" / "optim_000004_rank2.json").unlink()
    # Ray registered step 6 (it took that report, and the shard upload failed after it).
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(run_dir / "step_000006")))
    monkeypatch.setattr(train_common, "world_info", lambda: (0, 3))
    monkeypatch.setattr(train_common, "local_rank", lambda: 0)
    model, optimizer = tiny_model_and_optimizer(seed=0)
    cfg = {"storage_path": str(tmp_path / "storage"), "run_name": "run_b"}

    meta = restore_from_checkpoint(model, optimizer, torch.device("cpu"), cfg)
    assert meta["step"] == 2 and meta["model_verifications"] == 1
    assert torch.equal(model.lm_head.weight, models[2].lm_head.weight)
    output = capsys.readouterr().out
    assert "optim_000006_rank1.pt is missing" in output and "optim_000004_rank2.json is missing" in output
    assert f"resumed from checkpoint step 2 ({run_dir / 'step_000002'})" in output

    # With no complete step left, the run starts from scratch instead of failing at every retry.
    (run_dir / "step_000002" / "model_000002.pt").unlink()
    assert restore_from_checkpoint(model, optimizer, torch.device("cpu"), cfg) is None
    assert f"no complete checkpoint of run 'run_b' in {tmp_path / 'storage'}" in capsys.readouterr().out


def test_a_node_copies_from_remote_storage_the_shared_files_once_and_each_rank_its_own_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node_tmp"))  # the node's copy goes there
    os.makedirs(tempfile.tempdir)
    # A filesystem that is not the local one, as S3 is: the checkpoint is copied to the node.
    model, optimizer = tiny_model_and_optimizer(seed=2)
    tokenizer_dir = str(tmp_path / "tokenizer")
    Tokenizer.train_from_iterator(iter(_documents(50, seed=1)), 300).save(tokenizer_dir)
    folder = str(tmp_path / "storage" / "run_c" / "step_000002")
    for rank in (2, 1):
        save_checkpoint(folder, 2, None, None, optimizer_state=optimizer.state_dict(), rank=rank, world_size=3)
    save_checkpoint(folder, 2, model.state_dict(), {"model_config": model.config_dict()},
                    optimizer_state=optimizer.state_dict(), tokenizer_dir=tokenizer_dir, world_size=3)
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "storage"), pyarrow.fs.LocalFileSystem())
    shared = {"meta_000002.json", "model_000002.pt", "tokenizer"}
    leader_folder, copied = train_common.node_checkpoint_folder(remote, "run_c/step_000002", rank=0, node_leader=True)
    assert leader_folder.startswith(tempfile.tempdir)
    assert copied and set(os.listdir(leader_folder)) == shared | {"optim_000002_rank0.pt", "optim_000002_rank0.json"}
    other_folder, _ = train_common.node_checkpoint_folder(remote, "run_c/step_000002", rank=2, node_leader=False)
    assert other_folder == leader_folder  # the node's ranks share one copy
    assert set(os.listdir(leader_folder)) == shared | {f"optim_000002_rank{r}.{ext}" for r in (0, 2)
                                                       for ext in ("pt", "json")}
    model_state, optimizer_state, _ = load_checkpoint(leader_folder, 2, "cpu", load_optimizer=True, rank=2,
                                                      model_verified=True)
    assert torch.equal(model_state["lm_head.weight"], model.lm_head.weight) and optimizer_state is not None
    # A local path is read in place, nothing is copied.
    folder, copied = train_common.node_checkpoint_folder(pyarrow.fs.LocalFileSystem(),
                                                         str(tmp_path / "storage" / "run_c" / "step_000002"), 1, True)
    assert folder == str(tmp_path / "storage" / "run_c" / "step_000002") and not copied
