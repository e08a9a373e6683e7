"""Pretraining on a 3-node cluster that loses a node (ray_jobs/base_train.py on
`ray.cluster_utils.Cluster`).

Three 1-CPU nodes on this machine, and storage they all share (a local folder is shared by the
nodes of one machine, as an NFS mount or a bucket is on a real cluster). base_train runs with 3
workers and `--placement-strategy STRICT_SPREAD`, a tiny GPT on the grammar shards of
tests/test_base_train.py. Once storage holds the run's first complete checkpoint, a node that
holds a train worker (never the head, where the driver runs) is removed, and a node is added in
its place: with a fixed --num-workers, Ray Train waits until it can place all 3 workers again,
one per node (see README, Running on a cluster).

The cluster needs a driver of its own and this process may already be connected to the session's
`ray_local`, so the runs happen in a subprocess (`python -m tests.test_base_train_cluster OUT.json`,
the code at the end of this file) that writes what it saw to a JSON file; the tests assert on it.
Checked: every start of the worker group put one worker on each of three nodes (the node ids the
ranks recorded in the run's history); the restart avoided the removed node and used the added one;
it restored the checkpoint that was complete when the node went, its stream started at that
checkpoint's shard with no row skipped; and the restored group went on from the checkpoint's
weights (tests/test_base_train.py shows on one node that such a restore ends at the val bpb of an
uninterrupted run).

Without a cluster: a resume with another --num-workers than the run's is refused on the driver,
and --placement-strategy reaches Ray Train's ScalingConfig.
"""

import argparse
import json
import os
import sys
import threading
import time

import pytest

from nanochat.checkpoint import save_checkpoint
from ray_jobs import train_common
from ray_jobs.base_train import parse_args
from ray_jobs.train_common import previous_run
from tests.cluster_driver import start_driver
from tests.test_base_train import _documents, tiny_model_and_optimizer

STEPS = 36
SAVE_EVERY = 12
NUM_WORKERS = 3


@pytest.fixture(scope="module")
def cluster_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base_train_cluster")
    driver = start_driver("tests.test_base_train_cluster", folder, str(folder),
                          env={"NANOCHAT_BASE_DIR": str(folder / "base")})
    return driver.report(timeout_s=300)


def _starts(history: list[dict]) -> list[dict]:
    return [record for record in history if "worker_nodes" in record]


def test_every_start_puts_one_worker_on_each_node(cluster_report):
    starts = _starts(cluster_report["disturbed"]["history"])
    assert len(starts) == 2
    for start in starts:
        assert len(start["worker_nodes"]) == NUM_WORKERS
        assert len(set(start["worker_nodes"])) == NUM_WORKERS, start
    assert set(starts[0]["worker_nodes"]) == set(cluster_report["first_nodes"])


def test_the_lost_nodes_worker_is_restarted_on_the_added_node(cluster_report):
    disturbed = cluster_report["disturbed"]
    first, restart = _starts(disturbed["history"])
    assert disturbed["removed_node"] in first["worker_nodes"]
    assert disturbed["removed_node"] != cluster_report["head_node"]
    assert disturbed["removed_node"] not in restart["worker_nodes"]
    assert set(restart["worker_nodes"]) == set(first["worker_nodes"]) - {disturbed["removed_node"]} | {
        disturbed["added_node"]}


def test_the_restart_resumes_from_the_checkpoint_complete_when_the_node_went(cluster_report):
    disturbed = cluster_report["disturbed"]
    [restore] = [record for record in disturbed["history"] if record.get("restored_from_checkpoint")]
    assert disturbed["first_checkpoint_step"] == SAVE_EVERY
    assert restore["step"] == disturbed["checkpoint_step_at_removal"] < STEPS
    # the stream starts again at the checkpoint's shard, skipping no row to get there
    assert restore["stream_start"] == restore["data_position"]["file_index"]
    assert restore["skipped_rows"] == 0
    # One rank per node hashes the model file it restores, the first of the node's local ranks.
    # Ray Train numbers local ranks per node IP, and these nodes share this machine's: one did.
    assert restore["model_verifications"] == 1
    # the history is the checkpoint's and the restarted group's: the steps the lost group took
    # after the checkpoint are done again, and recorded once
    assert [record["step"] for record in disturbed["history"] if "loss" in record] == list(range(1, STEPS + 1))


def test_the_restored_group_goes_on_from_the_checkpoints_weights(cluster_report):
    # The first step sees near-uniform predictions, ln(512) = 6.24 nats; by the checkpoint at step
    # 12 the loss is about 3.0 and still falling 0.2-0.3 a step (measured: 2.96, then 2.75 at step
    # 13 after the restore). A group that lost the weights would start again near 6.2.
    disturbed = cluster_report["disturbed"]
    losses = {record["step"]: record["loss"] for record in disturbed["history"] if "loss" in record}
    assert losses[SAVE_EVERY] < losses[1] - 2.0
    assert losses[SAVE_EVERY] - 0.5 < losses[SAVE_EVERY + 1] < losses[SAVE_EVERY]
    # and it learned: its val bpb is far below the unigram model's of the same rows (measured 0.35x)
    assert disturbed["val_bpb"] < 0.5 * disturbed["val_unigram_bpb"]


# ---------------------------------------------------------------- worker count and placement, without a cluster


def test_a_resume_with_another_worker_count_is_refused_before_the_run_starts(tmp_path):
    # The optimizer state is sharded over the ranks that saved it: a run of 3 workers resumes
    # with 3. Before the driver checked, every worker failed at its load, once per restart.
    model, optimizer = tiny_model_and_optimizer(seed=0)
    folder = str(tmp_path / "run_w3" / "step_000004")
    for rank in (2, 1):
        save_checkpoint(folder, 4, None, None, optimizer_state=optimizer.state_dict(), rank=rank, world_size=3)
    save_checkpoint(folder, 4, model.state_dict(), {"model_config": model.config_dict()},
                    optimizer_state=optimizer.state_dict(), world_size=3)
    cfg = {"storage_path": str(tmp_path), "run_name": "run_w3"}
    for workers in (2, 4):
        with pytest.raises(ValueError, match="trained by 3 workers.*resume it with --num-workers 3"):
            previous_run(cfg, argparse.Namespace(resume=True, num_workers=workers))
    assert previous_run(cfg, argparse.Namespace(resume=True, num_workers=3))["step"] == 4


def test_the_placement_strategy_reaches_ray_trains_scaling_config(monkeypatch):
    trainers = []

    class RecordingTrainer:
        def __init__(self, train_loop, **kwargs):
            trainers.append(kwargs)

        def fit(self):
            return "result"

    monkeypatch.setattr(train_common, "TorchTrainer", RecordingTrainer)
    args = parse_args(["--num-workers", "3", "--placement-strategy", "STRICT_SPREAD", "--max-failures", "0"])
    cfg = {"use_gpu": False, "run_name": "placed", "storage_path": "/tmp/unused"}
    assert train_common.fit_trainer("base_train", None, {}, cfg, args, {"CPU": 1},
                                    placement_strategy=args.placement_strategy) == "result"
    scaling = trainers[0]["scaling_config"]
    assert (scaling.num_workers, scaling.placement_strategy) == (3, "STRICT_SPREAD")
    assert parse_args([]).placement_strategy == "PACK"  # a node's GPUs first


def test_an_unknown_placement_strategy_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--placement-strategy", "SIDEWAYS"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'SIDEWAYS'" in capsys.readouterr().err


# ---------------------------------------------------------------- the cluster driver


def _flags(work: str, shards: str) -> list[str]:
    """base_train's flags: depth 2, width 64, T=64, 3 workers of 4 rows, one
    micro-step per step, the learning rates of tests/test_base_train.py. Each worker holds a
    quarter of its node's CPU, as does its lane's packer: a node keeps half a CPU for the read
    and tokenize tasks, wherever the packers land (the default share, 0.42 of the cluster's 3
    CPUs each, left 0.33 on the node of a worker and a packer, less than a tokenize task asks)."""
    return ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
            "--window-pattern", "L", "--device-batch-size", "4", "--total-batch-size", str(NUM_WORKERS * 4 * 64),
            "--num-iterations", str(STEPS), "--source", "local", "--data-dir", shards, "--pack-buffer-docs", "16",
            "--eval-every", "-1", "--eval-tokens", "2304", "--sample-every", "-1", "--save-every", str(SAVE_EVERY),
            "--storage-path", os.path.join(work, "runs"), "--compile", "off", "--num-workers", str(NUM_WORKERS),
            "--placement-strategy", "STRICT_SPREAD", "--cpus-per-worker", "0.25", "--matrix-lr", "0.16",
            "--embedding-lr", "1.6", "--unembedding-lr", "0.032", "--scalar-lr", "4", "--warmup-steps", "0"]


def _cluster_runs(out_path: str, work: str) -> None:
    """Run in a subprocess: shards and tokenizer, a 3-node cluster, the run that loses a node."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster

    from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
    from ray_jobs import base_train
    from ray_jobs.train_common import latest_run_checkpoint

    started = time.perf_counter()
    shards = os.path.join(work, "shards")
    os.makedirs(shards)
    # 15 train shards of about 40 rows each: 5 per lane, more than a lane's 36 steps of 4 rows
    # (a lane whose epoch ends starts a new Ray Data execution: tens of seconds on a busy machine)
    for index in range(16):
        pq.write_table(pa.table({"text": _documents(60, seed=index)}),
                       os.path.join(shards, f"shard_{index:05d}.parquet"))
    Tokenizer.train_from_iterator(iter(_documents(300, seed=100)), 512).save(get_tokenizer_dir())
    flags = _flags(work, shards)

    # Cluster records its address in /tmp/ray for a later bare ray.init() to find; other Ray users
    # of this machine could then join it by mistake. This driver passes the address explicitly.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    report = {"head_node": cluster.head_node.node_id, "first_nodes": [cluster.head_node.node_id] +
              [node.node_id for node in nodes], "cluster_start_s": time.perf_counter() - started}
    try:
        # The run goes on in a thread; this thread watches storage and changes the cluster (Ray
        # starts a node's processes from the main thread only).
        begun, outcome = time.perf_counter(), {}
        runner = threading.Thread(target=lambda: outcome.update(result=base_train.main(
            flags + ["--run-name", "disturbed", "--model-tag", "cluster_disturbed"])), daemon=True)
        runner.start()
        while (found := latest_run_checkpoint(os.path.join(work, "runs"), "disturbed")) is None and runner.is_alive():
            time.sleep(0.02)
        assert found is not None, "the disturbed run ended before it had a complete checkpoint"
        # the checkpoint's history says which nodes hold train workers: remove one that is not the head
        workers = [record for record in found[1]["history"] if "worker_nodes" in record][-1]["worker_nodes"]
        victim = next(node for node in nodes if node.node_id in workers)
        cluster.remove_node(victim)
        removed_at = time.perf_counter() - begun
        # what a restart can restore: the newest step complete once the node is gone (on a busy
        # machine the run may have completed the next checkpoint before the removal took effect)
        restorable = latest_run_checkpoint(os.path.join(work, "runs"), "disturbed")[1]["step"]
        added = cluster.add_node(num_cpus=1)
        runner.join(timeout=180)
        result = outcome["result"]
        report["disturbed"] = {"first_checkpoint_step": found[1]["step"], "checkpoint_step_at_removal": restorable,
                               "removed_node": victim.node_id,
                               "removed_at_s": removed_at, "added_node": added.node_id, "history": result["history"],
                               "val_bpb": result["val_bpb"], "val_unigram_bpb": result["val_unigram_bpb"],
                               "seconds": time.perf_counter() - begun}
        report["total_s"] = time.perf_counter() - started
    finally:
        ray.shutdown()
        cluster.shutdown()
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    _cluster_runs(sys.argv[1], sys.argv[2])
