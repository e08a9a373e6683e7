"""The whole pipeline, stage after stage, each stage its own Ray job.

    python -m ray_jobs.speedrun --preset tiny            # offline, about 10 minutes on 2 CPUs
    python -m ray_jobs.speedrun --preset gpt2 --rl       # nanochat's speedrun today, on a cluster
    python -m ray_jobs.speedrun --preset d20 --rl        # the seed's older GPU run

Every stage is submitted through the Ray Job Submission API, so it shows in the dashboard with its
own logs; `--inline` runs the stages one after the other in this process instead. The pipeline
stops at the first failing stage with that stage's error; `--from STAGE` starts there again.
A stage whose output already exists (data, tokenizer, checkpoints) is skipped unless `--fresh`.

The report card (nanochat.report): every stage's driver logs its section into <base>/report/, and
this driver adds each stage's wall time (job start-up included). A run that runs every stage from
the first starts a fresh report (`Report().reset()`); a run with `--from`, or one that reuses some
stages' output, keeps the earlier sections, which describe the output it reuses. The run ends by
writing <base>/report/report.md, also when a stage failed: the report then shows the stages that
finished, and the failure line says where to resume.

Every stage that checkpoints (base_train, chat_sft, chat_rl) runs with `--resume`, so that `--from
STAGE` after a lost driver continues the stage's run instead of refusing to start it. Their
checkpoints go to `--storage-path`; for the GPU presets its default is $NANOCHAT_STORAGE, which
cluster.yaml sets to an S3 prefix that every node reaches (the tiny preset keeps each stage's
local default, <base>/ray_runs). A stage's job log is followed as its driver writes it
(JobSubmissionClient.tail_job_logs), not downloaded again and again.

The Job Submission client sends Ray's token (ray_jobs.ray_auth): run by hand, the speedrun turns
token authentication on when RAY_AUTH_MODE is unset and a token exists (~/.ray/auth_token); as a
job of a cluster with token authentication, it inherits RAY_AUTH_MODE=token from the cluster.
"""

import argparse
import asyncio
import importlib.util
import os
import runpy
import shlex
import sys
import time
from dataclasses import dataclass, field

from nanochat.files import get_base_dir
from nanochat.report import Report, git_commit
from ray_jobs.ray_auth import use_token_auth


# The tiny preset's settings, tuned on 2 CPUs so that the pipeline (data to chat_eval) takes about
# 10 minutes: a depth-4 model (width 128, 2 heads of 64) at a 1024-token context, which holds a chat
# of ten short turns. At equal time (about 4 minutes of base_train) depth 4 and depth 3 reached the
# same val bpb (1.694 after 400 steps, 1.696 after 560); depth 4 keeps more room for the SFT skills.
# One train worker with both cores steps faster than two of one core each, so both training stages
# run on one worker (the SFT optimizer warm-starts from that worker's shard). SFT on the offline
# mixture (with MultiTurn's chains of exchanges) reaches 100% on arithmetic and 58-61% on
# SpellingBee (100 problems each, nanochat's calculator protocol).
TINY_BASE_TRAIN = ["--depth", "4", "--aspect-ratio", "32", "--head-dim", "64", "--max-seq-len", "1024",
                   "--window-pattern", "L", "--device-batch-size", "4", "--total-batch-size", "4096",
                   "--num-iterations", "400", "--matrix-lr", "0.2", "--embedding-lr", "2", "--unembedding-lr", "0.04",
                   "--scalar-lr", "5", "--eval-every", "100", "--eval-tokens", "32768", "--sample-every", "-1",
                   "--source", "sample", "--num-workers", "1"]
# SFT's learning rates default to the base run's flags as given (nanochat's rule). The tiny base
# run's flags are far above 2**19-token rates (base_train scales them by sqrt(4096 / 2**19)), so
# the tiny SFT passes the rates it was tuned with: the flags x sqrt(2048 / 2**19) = 1/16.
TINY_CHAT_SFT = ["--mixture", "offline", "--total-batch-size", "4096", "--eval-every", "100", "--eval-tokens", "32768",
                 "--matrix-lr", "0.0125", "--embedding-lr", "0.125", "--unembedding-lr", "0.0025", "--scalar-lr", "0.3125",
                 "--num-workers", "1", "--device-batch-size", "4"]
TINY_CHAT_EVAL = ["--tasks", "arithmetic,spellingbee", "--max-problems", "100", "--max-new-tokens", "256"]
TINY_CHAT_RL = ["--task", "arithmetic", "--num-steps", "20", "--examples-per-step", "8", "--num-samples", "16",
                "--max-new-tokens", "128", "--eval-every", "10", "--eval-examples", "64", "--eval-k", "4",
                "--save-every", "-1"]


# CPUs each stage's job driver reserves (`entrypoint_num_cpus`), per preset. On cluster.yaml the
# head offers Ray no CPUs (it runs GCS, the dashboard and the NFS export), so a driver that asks
# for one CPU, and with it the Train controller and the Data split coordinator it starts beside
# itself, runs on a worker node. The tiny preset runs on a local head of 2 CPUs, where a driver
# holding a CPU for its whole stage would leave the stage's own train workers and Ray Data tasks
# waiting for it: there the drivers reserve nothing and run anywhere.
ENTRYPOINT_NUM_CPUS = {"tiny": 0, "gpt2": 1, "d20": 1, "d26": 1}
GPU_PRESETS = ("gpt2", "d20", "d26")
PRESETS = ("tiny", *GPU_PRESETS)
# The GPU presets' pretraining data and recipe. gpt2 is nanochat's speedrun today (runs/speedrun.sh,
# its time-to-GPT-2 run): depth 24 on ClimbMix-400B, 170 shards, slightly undertrained at 8 tokens
# per scaling parameter, 16 rows per GPU, fp8 matmuls and bf16 embeddings. d20 and d26 are the
# seed's older runs on FineWeb-Edu at the default ratio of 12, kept as they were.
GPU_PRETRAINING = {
    "gpt2": dict(depth=24, source="climbmix", shards=170, device_batch_size=16, param_data_ratio=8, fp8=True,
                 embedding_dtype="bfloat16"),
    "d20": dict(depth=20, source="fineweb-edu", shards=240, device_batch_size=32, param_data_ratio=12, fp8=False,
                embedding_dtype="float32"),
    "d26": dict(depth=26, source="fineweb-edu", shards=450, device_batch_size=16, param_data_ratio=12, fp8=False,
                embedding_dtype="float32"),
}
# Validation tokens per bpb evaluation on the GPU presets: nanochat's 80 x 2**19 (base_train's own
# default, 10 x 2**19, suits runs on fewer devices).
GPU_EVAL_TOKENS = 80 * 2 ** 19
# The stages that checkpoint through Ray Train: they get --resume and --storage-path.
CHECKPOINTING_STAGES = ("base_train", "chat_sft", "chat_rl")


@dataclass
class Stage:
    name: str
    module: str
    flags: list[str] = field(default_factory=list)
    done_marker: str | None = None  # a path under the base dir that exists once the stage has run
    report_as: str | None = None  # the report section its driver logs, when not named as the stage

    def is_built(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def is_done(self) -> bool:
        return self.done_marker is not None and os.path.exists(os.path.join(get_base_dir(), self.done_marker))


def preset_stages(preset: str, with_rl: bool) -> list[Stage]:
    """The stages of a preset, in order, with the preset's flags."""
    if preset == "tiny":
        tag = "tiny"
        stages = [
            Stage("data", "ray_jobs.download_data", ["--source", "sample", "--max-bytes", "20000000"],
                  "base_data/sample/sample_manifest.json"),
            Stage("tokenizer", "ray_jobs.tok_train", ["--source", "sample", "--vocab-size", "4096",
                                                      "--max-chars", "20000000"], "tokenizer/token_bytes.pt"),
            Stage("tok_eval", "ray_jobs.tok_eval", ["--source", "sample"]),
            Stage("base_train", "ray_jobs.base_train", [*TINY_BASE_TRAIN, "--model-tag", tag, "--resume"],
                  f"base_checkpoints/{tag}"),
            Stage("base_eval", "ray_jobs.base_eval", ["--model-tag", tag, "--eval", "bpb,sample",
                                                      "--source", "sample", "--split-tokens", "131072"]),
            Stage("chat_sft", "ray_jobs.chat_sft", ["--model-tag", tag, *TINY_CHAT_SFT, "--resume"],
                  f"chatsft_checkpoints/{tag}"),
            Stage("chat_eval", "ray_jobs.chat_eval", ["--source", "sft", "--model-tag", tag, *TINY_CHAT_EVAL]),
        ]
        if with_rl:
            stages += [Stage("chat_rl", "ray_jobs.chat_rl", ["--model-tag", tag, *TINY_CHAT_RL, "--resume"],
                             f"chatrl_checkpoints/{tag}"),
                       Stage("chat_eval_rl", "ray_jobs.chat_eval", ["--source", "rl", "--model-tag", tag,
                                                                    *TINY_CHAT_EVAL], report_as="chat_eval")]
        return stages
    if preset in GPU_PRETRAINING:
        spec = GPU_PRETRAINING[preset]
        tag = f"d{spec['depth']}"
        source, device_batch = spec["source"], str(spec["device_batch_size"])
        stages = [
            Stage("data", "ray_jobs.download_data", ["--source", source, "-n", str(spec["shards"])]),
            Stage("tokenizer", "ray_jobs.tok_train", ["--source", source, "--vocab-size", "32768",
                                                      "--max-chars", "2000000000"], "tokenizer/token_bytes.pt"),
            Stage("tok_eval", "ray_jobs.tok_eval", ["--source", source]),
            Stage("base_train", "ray_jobs.base_train",
                  ["--depth", str(spec["depth"]), "--num-workers", "8", "--device-batch-size", device_batch,
                   "--target-param-data-ratio", f"{spec['param_data_ratio']:g}", *(["--fp8"] if spec["fp8"] else []),
                   "--embedding-dtype", spec["embedding_dtype"], "--source", source,
                   "--eval-tokens", str(GPU_EVAL_TOKENS), "--save-every", "1000",
                   "--core-metric-every", "2000", "--model-tag", tag, "--resume", "--use-gpu", "on"],
                  f"base_checkpoints/{tag}"),
            Stage("base_eval", "ray_jobs.base_eval", ["--model-tag", tag, "--device-batch-size", device_batch]),
            Stage("chat_sft", "ray_jobs.chat_sft", ["--model-tag", tag, "--mixture", "real", "--num-workers", "8",
                                                    "--resume", "--use-gpu", "on"],
                  f"chatsft_checkpoints/{tag}"),
            Stage("chat_eval", "ray_jobs.chat_eval", ["--source", "sft", "--model-tag", tag]),
        ]
        if with_rl:
            stages += [Stage("chat_rl", "ray_jobs.chat_rl", ["--model-tag", tag, "--task", "gsm8k", "--resume",
                                                             "--use-gpu", "on"],
                             f"chatrl_checkpoints/{tag}"),
                       Stage("chat_eval_rl", "ray_jobs.chat_eval", ["--source", "rl", "--model-tag", tag,
                                                                    "--tasks", "gsm8k"], report_as="chat_eval")]
        return stages
    raise ValueError(f"unknown preset {preset!r}: choose {', '.join(PRESETS)}")


def run_inline(stage: Stage) -> None:
    """Run a stage's module in this process, as `python -m` would."""
    saved_argv = sys.argv
    sys.argv = [stage.module, *stage.flags]
    try:
        runpy.run_module(stage.module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise RuntimeError(f"stage {stage.name} exited with status {exc.code}") from exc
    finally:
        sys.argv = saved_argv


def run_as_job(stage: Stage, address: str, working_dir: str, entrypoint_num_cpus: float = 0) -> None:
    """Submit a stage as a Ray job whose driver reserves `entrypoint_num_cpus` CPUs (0: it runs on
    any node, the head included), print its log here as the driver writes it, and raise if the job
    does not succeed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    use_token_auth()
    client = JobSubmissionClient(address)
    entrypoint = shlex.join(["python", "-m", stage.module, *stage.flags])
    job_id = None
    for attempt in range(30):
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                submission_id=f"nanochat-{stage.name}-{int(time.time())}",
                entrypoint_num_cpus=entrypoint_num_cpus,
                runtime_env={"working_dir": working_dir,
                             "excludes": [".venv", ".git", "*.egg-info", "__pycache__", ".pytest_cache",
                                          ".ruff_cache", ".hypothesis"],
                             "env_vars": {"NANOCHAT_BASE_DIR": get_base_dir(), "NANOCHAT_GIT_COMMIT": git_commit()}},
            )
            break
        except RuntimeError as exc:
            # A head that has just started answers before its job agent is up: wait for it.
            if "No available agent" not in str(exc) or attempt == 29:
                raise
            time.sleep(2)
    print(f"[speedrun] stage {stage.name}: submitted job {job_id} ({entrypoint_num_cpus:g} CPU for its driver): "
          f"{entrypoint}", flush=True)
    follow_job_logs(client, job_id)
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the log stream may close a moment before the status changes
        time.sleep(1)
        status = client.get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        # The job's message repeats the tail of its logs, which were just printed: keep its first part.
        reason = (client.get_job_info(job_id).message or "").split(", last available logs")[0]
        raise RuntimeError(f"stage {stage.name} (job {job_id}) {status.value.lower()}: {reason}")


def follow_job_logs(client, job_id: str) -> None:
    """Print a job's log here as its driver writes it, until the job ends: the dashboard streams
    new lines over one websocket (tail_job_logs), instead of the whole log being fetched again
    every few seconds. A stream that breaks (the dashboard restarted) is reported, not fatal: the
    caller still waits for the job's status, and `ray job logs` has the full log."""
    import aiohttp

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except (RuntimeError, aiohttp.ClientError) as exc:
        print(f"[speedrun] lost the log stream of job {job_id} ({exc}); waiting for the job to end; "
              f"its full log: ray job logs {job_id}", flush=True)


def storage_path_for(preset: str, flag: str | None) -> str | None:
    """Where the checkpointing stages keep their Ray Train runs: --storage-path when given, else
    $NANOCHAT_STORAGE for the GPU presets (cluster.yaml sets it to an S3 prefix every node
    reaches), else None: each stage's own default, <base>/ray_runs, a local folder."""
    if flag:
        return flag
    if preset in GPU_PRESETS:
        return os.environ.get("NANOCHAT_STORAGE") or None
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run the nanochat pipeline, one Ray job per stage")
    p.add_argument("--preset", choices=PRESETS, default="tiny",
                   help="tiny: offline, on CPUs; gpt2: nanochat's speedrun today (d24, ClimbMix, fp8); d20, d26: "
                        "the seed's older GPU runs (FineWeb-Edu)")
    p.add_argument("--rl", action="store_true", help="also run the RL stage")
    p.add_argument("--from", dest="from_stage", default=None, help="start at this stage")
    p.add_argument("--fresh", action="store_true", help="run stages even when their output exists")
    p.add_argument("--inline", action="store_true", help="run the stages in this process, not as Ray jobs")
    p.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265"),
                   help="the Ray dashboard (job submission) address")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None,
                   help="CPUs each stage's job driver reserves (default: 0 for tiny, 1 for the GPU presets, which "
                        "keeps the drivers off a head that offers no CPUs)")
    p.add_argument("--storage-path", default=None,
                   help="checkpoint storage of base_train, chat_sft and chat_rl: folder or URI (s3://...); "
                        "default $NANOCHAT_STORAGE for the GPU presets, <base>/ray_runs for tiny")
    args = p.parse_args(argv)
    entrypoint_num_cpus = (ENTRYPOINT_NUM_CPUS[args.preset] if args.entrypoint_num_cpus is None
                           else args.entrypoint_num_cpus)
    storage_path = storage_path_for(args.preset, args.storage_path)

    stages = preset_stages(args.preset, args.rl)
    if storage_path:
        for stage in stages:
            if stage.name in CHECKPOINTING_STAGES:
                stage.flags = [*stage.flags, "--storage-path", storage_path]
    names = [s.name for s in stages]
    if args.from_stage is not None:
        if args.from_stage not in names:
            p.error(f"--from {args.from_stage}: not a stage of preset {args.preset}; stages are {', '.join(names)}")
        stages = stages[names.index(args.from_stage):]
    working_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    print(f"[speedrun] preset {args.preset}: stages {', '.join(s.name for s in stages)}; base dir {get_base_dir()}; "
          f"checkpoint storage {storage_path or os.path.join(get_base_dir(), 'ray_runs')}", flush=True)
    report = Report()
    reused = [s.name for s in stages if s.is_built() and s.is_done() and not args.fresh]
    if args.from_stage is None and not reused:
        report.reset()
    missing = []
    for stage in stages:
        if not stage.is_built():
            missing.append(stage.name)
            print(f"[speedrun] stage {stage.name}: {stage.module} is not part of this version yet; skipped",
                  flush=True)
            continue
        if stage.name in reused:
            print(f"[speedrun] stage {stage.name}: output exists ({stage.done_marker}); skipped (use --fresh to redo)",
                  flush=True)
            continue
        if args.fresh and "--resume" in stage.flags:
            # a new Ray Train run instead of continuing the previous one
            stage.flags = [*stage.flags, "--run-name", f"{args.preset}_{stage.name}_{int(time.time())}"]
        started = time.time()
        try:
            if args.inline:
                run_inline(stage)
            else:
                run_as_job(stage, args.address, working_dir, entrypoint_num_cpus)
        except Exception as exc:  # the pipeline stops here and says why, in one line
            print(f"[speedrun] FAILED at stage {stage.name}: {exc}\n[speedrun] fix it and resume with "
                  f"--from {stage.name}", flush=True)
            print(f"[speedrun] report of the stages that finished: {report.write_report()}", flush=True)
            return 1
        report.record_wall_time(stage.report_as or stage.name, time.time() - started)
        print(f"[speedrun] stage {stage.name}: done in {time.time() - started:.0f}s", flush=True)
    if missing:
        print(f"[speedrun] not built yet in this version: {', '.join(missing)}", flush=True)
    print(f"[speedrun] pipeline finished; report: {report.write_report()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
