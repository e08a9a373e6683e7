"""Tests of the CORE metric (nanochat/core_eval.py) on a small eval bundle in the real format.

The bundle (core.yaml, eval_meta_data.csv, eval_data/**/*.jsonl, zipped under eval_bundle/) is
written here, served from 127.0.0.1 and downloaded through download_eval_bundle. The model is a
test double that has memorised a few texts, so which examples it gets right is known in advance,
and the tokenizer is a byte-level double (ids 0-255 are bytes, 256 is BOS) whose tokens are easy to
reason about.
"""

import functools
import http.server
import json
import os
import threading
import zipfile
from types import SimpleNamespace

import pytest
import torch

from nanochat.core_eval import (CoreTask, centered_accuracy, core_score, download_eval_bundle, evaluate_example,
                                evaluate_task, fewshot_examples, load_core_tasks, render_prompts_lm,
                                render_prompts_mc, render_prompts_schema, scored_spans, truncate_left)

BOS = 256

MC_DATA = [
    {"query": "The sky on a clear day is", "choices": ["green", "blue", "loud"], "gold": 1},
    {"query": "Snow is usually", "choices": ["white", "purple", "square"], "gold": 0},
    {"query": "A cat says", "choices": ["moo", "quack", "meow"], "gold": 2},
    {"query": "Fish live in", "choices": ["trees", "water", "fire"], "gold": 1},
]
SCHEMA_DATA = [
    {"context_options": ["Tom thanked Ann because Ann", "Tom thanked Ann because Tom"],
     "continuation": "had helped him.", "gold": 0},
    {"context_options": ["The cup fell off the shelf because the cup", "The cup fell off the shelf because the shelf"],
     "continuation": "was tilted.", "gold": 1},
    {"context_options": ["Max outran Leo since Max", "Max outran Leo since Leo"],
     "continuation": "was faster.", "gold": 0},
    {"context_options": ["The ice melted in the sun since the ice", "The ice melted in the sun since the sun"],
     "continuation": "was hot.", "gold": 1},
]
LM_DATA = [
    {"context": "Two plus two is ", "continuation": "four"},
    {"context": "The capital of France is", "continuation": "Paris"},
    {"context": "Bees make", "continuation": "honey"},
    {"context": "The moon is made of", "continuation": "rock"},
]
# What the scripted model has memorised: every multiple-choice answer, three schema answers and one
# schema mistake (item 3 names the ice), two language-modeling answers and two wrong ones.
MEMORISED = [
    "The sky on a clear day is blue", "Snow is usually white", "A cat says meow", "Fish live in water",
    "Tom thanked Ann because Ann had helped him.", "The cup fell off the shelf because the shelf was tilted.",
    "Max outran Leo since Max was faster.", "The ice melted in the sun since the ice was hot.",
    "Two plus two is four", "The capital of France is Paris", "Bees make wax", "The moon is made of cheese",
]
TASKS_YAML = """\
icl_tasks:
-
  label: toy_mc
  dataset_uri: common_sense/toy_mc.jsonl
  num_fewshot: [1]
  icl_task_type: multiple_choice
  continuation_delimiter: ' '
-
  label: toy_schema
  dataset_uri: language_understanding/toy_schema.jsonl
  num_fewshot: [0]
  icl_task_type: schema
-
  label: toy_lm
  dataset_uri: world_knowledge/toy_lm.jsonl
  num_fewshot: [2]
  icl_task_type: language_modeling
  continuation_delimiter: ' '
  has_categories: false
"""
META_CSV = """\
Eval Task,Task Category,Task Type,#shots,Random baseline
toy_mc,commonsense reasoning,multiple choice,1,33.3
toy_schema,language understanding,schema,0,50
toy_lm,world knowledge,language modeling,2,0
"""


class ByteTokenizer:
    """The Tokenizer interface core_eval uses, on raw UTF-8 bytes."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None):
        prefix = [] if prepend is None else [prepend]
        return [prefix + list(text.encode("utf-8")) for text in texts]


class MemorisingModel:
    """Predicts the next byte of a memorised text wherever the input runs along the start of one.

    At each position it looks for the longest stretch ending there that equals the beginning of a
    memorised text and puts a large logit on that text's next byte; elsewhere its logits are flat.
    So a continuation that completes a memorised text costs almost nothing and any other costs
    about log(257) nats per byte."""

    def __init__(self, texts, sequence_len=1024):
        self.texts = [text.encode("utf-8") for text in texts]
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.longest_input = 0

    def __call__(self, idx):
        self.longest_input = max(self.longest_input, idx.size(1))
        logits = torch.zeros(idx.size(0), idx.size(1), BOS + 1)
        for row, ids in enumerate(idx.tolist()):
            seen = bytes(i if i < BOS else 0 for i in ids)
            for pos in range(len(seen)):
                next_byte = self._next_byte(seen[:pos + 1])
                if next_byte is not None:
                    logits[row, pos, next_byte] = 10.0
        return logits

    def _next_byte(self, seen):
        best_length, best = 0, None
        for text in self.texts:
            for length in range(min(len(text) - 1, len(seen)), best_length, -1):
                if seen.endswith(text[:length]):
                    best_length, best = length, text[length]
                    break
        return best


def write_bundle_zip(zip_path):
    files = {
        "eval_bundle/core.yaml": TASKS_YAML,
        "eval_bundle/eval_meta_data.csv": META_CSV,
        "eval_bundle/eval_data/common_sense/toy_mc.jsonl": MC_DATA,
        "eval_bundle/eval_data/language_understanding/toy_schema.jsonl": SCHEMA_DATA,
        "eval_bundle/eval_data/world_knowledge/toy_lm.jsonl": LM_DATA,
    }
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name, content in files.items():
            if isinstance(content, list):
                content = "".join(json.dumps(row) + "\n" for row in content)
            archive.writestr(name, content)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A base dir of this test's own, so that the downloaded bundle is not shared."""
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


@pytest.fixture
def bundle_server(tmp_path):
    """http://127.0.0.1:<port> serving eval_bundle.zip; yields (url, list of requested paths)."""
    served = tmp_path / "served"
    served.mkdir()
    write_bundle_zip(served / "eval_bundle.zip")
    requests = []

    class Handler(QuietHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


@pytest.fixture
def bundle_dir(base_dir, bundle_server):
    url, _ = bundle_server
    return download_eval_bundle(base_url=url)


# ----------------------------------------------------------------------------------------------
# The bundle


def test_download_places_the_bundle_atomically_and_only_once(base_dir, bundle_server):
    url, requests = bundle_server
    path = download_eval_bundle(base_url=url)
    assert path == str(base_dir / "eval_bundle")
    assert sorted(os.listdir(path)) == ["core.yaml", "eval_data", "eval_meta_data.csv"]
    # Nothing but the bundle is left behind: no zip, no temporary folder.
    assert os.listdir(base_dir) == ["eval_bundle"]
    assert download_eval_bundle(base_url=url) == path
    assert requests == ["/eval_bundle.zip"]


def test_download_retries_a_failing_server(base_dir, tmp_path):
    write_bundle_zip(tmp_path / "eval_bundle.zip")
    failures_left = [2]

    class Flaky(QuietHandler):
        def do_GET(self):
            if failures_left[0]:
                failures_left[0] -= 1
                self.send_error(503)
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Flaky, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = download_eval_bundle(base_url=f"http://127.0.0.1:{server.server_address[1]}", backoff_s=0.01)
    finally:
        server.shutdown()
        server.server_close()
    assert failures_left == [0]
    assert os.path.isfile(os.path.join(path, "core.yaml"))


def test_download_of_a_missing_bundle_fails_clearly_and_leaves_nothing(base_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(empty)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeError, match="could not download the CORE eval bundle"):
            download_eval_bundle(base_url=f"http://127.0.0.1:{server.server_address[1]}", backoff_s=0.01)
    finally:
        server.shutdown()
        server.server_close()
    assert os.listdir(base_dir) == []


def test_load_core_tasks_reads_types_shots_and_baselines(bundle_dir):
    tasks = load_core_tasks(bundle_dir)
    assert [(t.label, t.task_type, t.num_fewshot, t.continuation_delimiter, t.random_baseline) for t in tasks] == [
        ("toy_mc", "multiple_choice", 1, " ", 33.3),
        ("toy_schema", "schema", 0, " ", 50.0),
        ("toy_lm", "language_modeling", 2, " ", 0.0),
    ]
    # The examples are shuffled with a fixed seed: the same order on every load, all examples kept.
    assert [t.data for t in tasks] == [t.data for t in load_core_tasks(bundle_dir)]
    assert sorted(json.dumps(d) for d in tasks[0].data) == sorted(json.dumps(d) for d in MC_DATA)
    cut = load_core_tasks(bundle_dir, max_per_task=3)
    assert [t.data for t in cut] == [t.data[:3] for t in tasks]


def test_load_core_tasks_refuses_too_few_examples_for_the_shots(bundle_dir):
    with pytest.raises(ValueError, match=r"toy_lm.*2 examples.*draws 2 few-shot.*--max-per-task"):
        load_core_tasks(bundle_dir, max_per_task=2)


# ----------------------------------------------------------------------------------------------
# Prompts and scored spans, on hand examples


def test_multiple_choice_prompts():
    item = {"query": "Q2", "choices": ["a", "b"], "gold": 1}
    shot = {"query": "Q1", "choices": ["x", "y"], "gold": 0}
    assert render_prompts_mc(item, ": ", [shot]) == ["Q1: x\n\nQ2: a", "Q1: x\n\nQ2: b"]
    assert render_prompts_mc(item, " ", []) == ["Q2 a", "Q2 b"]


def test_schema_prompts():
    item = {"context_options": ["C1", "C2"], "continuation": "end", "gold": 0}
    shot = {"context_options": ["D1", "D2"], "continuation": "fin", "gold": 1}
    assert render_prompts_schema(item, " ", [shot]) == ["D2 fin\n\nC1 end", "D2 fin\n\nC2 end"]


def test_language_modeling_prompts_strip_contexts():
    item = {"context": "  ctx  ", "continuation": "cont"}
    shot = {"context": "c0 ", "continuation": "k0"}
    assert render_prompts_lm(item, " ", [shot]) == ["c0 k0\n\nctx", "c0 k0\n\nctx cont"]


def test_scored_spans_per_task_type():
    # multiple choice: after the common prefix; schema: the common suffix; LM: what the short prompt lacks
    assert scored_spans("multiple_choice", [[9, 1, 2, 3], [9, 1, 5]]) == ([[9, 1, 2, 3], [9, 1, 5]], [2, 2], [4, 3])
    assert scored_spans("schema", [[9, 1, 7, 8], [9, 2, 2, 7, 8]]) == ([[9, 1, 7, 8], [9, 2, 2, 7, 8]], [2, 3], [4, 5])
    assert scored_spans("language_modeling", [[9, 1], [9, 1, 4, 5]]) == ([[9, 1, 4, 5]], [2], [4])
    with pytest.raises(ValueError, match="prefix"):
        scored_spans("language_modeling", [[9, 1], [9, 2, 4]])


def test_truncate_left_keeps_the_end_and_shifts_the_span():
    tokens, starts, ends = truncate_left([list(range(10)), [0, 1, 2]], [7, 1], [10, 3], max_len=4)
    assert tokens == [[6, 7, 8, 9], [0, 1, 2]]
    assert (starts, ends) == ([1, 1], [4, 3])
    # A continuation longer than the context: its first kept token has nothing before it to predict it.
    assert truncate_left([list(range(10))], [2], [10], max_len=4) == ([[6, 7, 8, 9]], [1], [4])


def test_fewshot_examples_are_fixed_per_example_and_exclude_it():
    data = [{"id": i} for i in range(6)]
    draws = [fewshot_examples(data, i, 3) for i in range(6)]
    assert draws == [fewshot_examples(data, i, 3) for i in range(6)]
    assert all(data[i] not in draw and len(draw) == 3 for i, draw in enumerate(draws))
    assert fewshot_examples(data, 0, 0) == []


# ----------------------------------------------------------------------------------------------
# Scores


def test_memorising_model_scores_known_accuracies(bundle_dir):
    tasks = load_core_tasks(bundle_dir)
    model, tokenizer = MemorisingModel(MEMORISED), ByteTokenizer()
    accuracies = {t.label: evaluate_task(model, tokenizer, t.data, "cpu", t.meta) for t in tasks}
    assert accuracies == {"toy_mc": 1.0, "toy_schema": 0.75, "toy_lm": 0.5}

    score = core_score(tasks, accuracies)
    centered = {"toy_mc": (1.0 - 0.333) / (1 - 0.333), "toy_schema": (0.75 - 0.5) / (1 - 0.5), "toy_lm": 0.5}
    assert score["centered_results"] == pytest.approx(centered)
    assert score["core_metric"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)


def test_evaluate_task_on_a_subset_of_indices(bundle_dir):
    lm = load_core_tasks(bundle_dir)[2]
    model, tokenizer = MemorisingModel(MEMORISED), ByteTokenizer()
    right = [i for i, item in enumerate(lm.data) if item["continuation"] in ("four", "Paris")]
    wrong = [i for i in range(len(lm.data)) if i not in right]
    assert [evaluate_example(i, model, tokenizer, lm.data, "cpu", lm.meta) for i in right] == [True, True]
    assert evaluate_task(model, tokenizer, lm.data, "cpu", lm.meta, indices=wrong) == 0.0
    assert evaluate_task(model, tokenizer, lm.data, "cpu", lm.meta, indices=[right[0], wrong[0]]) == 0.5


def test_long_prompts_are_cut_to_the_models_context():
    task = CoreTask("toy_mc", "multiple_choice", 0, " ", 0.0, MC_DATA)
    model = MemorisingModel(MEMORISED, sequence_len=12)
    # Cut to the last 12 bytes ("ear day is " + choice) the model still recognises nothing of the
    # memorised start, but it must never see more than its context.
    evaluate_example(0, model, ByteTokenizer(), task.data, "cpu", task.meta)
    assert model.longest_input == 12


def test_centered_accuracy_by_hand():
    assert centered_accuracy(0.25, 25.0) == pytest.approx(0.0)
    assert centered_accuracy(0.625, 25.0) == pytest.approx(0.5)
    assert centered_accuracy(0.4, 0.0) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="missing"):
        core_score([CoreTask("a", "schema", 0, " ", 50.0, [])], {})
