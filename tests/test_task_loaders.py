"""The downloaded tasks against parquet files written here in each dataset's real schema and
served from 127.0.0.1 under the hub's paths: the downloader (cache, resume, retries, errors),
every loader, the known-answer-key evaluation of the multiple-choice sets, and HumanEval's
sandboxed scoring."""

import http.server
import io
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.execution import SandboxUnavailableError, execute_code
from nanochat.tasks import get_task
from nanochat.tasks.arc import ARC
from nanochat.tasks.common import DatasetDownloadError, download_hf_file, hf_file_url, task_data_path
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk


class HubHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files by path, honours Range, and plays scripted failures first:
    server.failures[path] is a list of HTTP status codes, or 'truncate' for a transfer that
    announces the whole file and stops halfway."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        failures = server.failures.get(self.path)
        if failures:
            failure = failures.pop(0)
            if failure == "truncate":
                data = server.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2])
                self.close_connection = True
                return
            self.send_error(failure)
            return
        if self.path not in server.files:
            self.send_error(404)
            return
        data = server.files[self.path]
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.files, server.failures, server.requests = {}, {}, []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}"

    def publish(repo_id: str, path_in_repo: str, table: pa.Table) -> bytes:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        server.files[f"/datasets/{repo_id}/resolve/main/{path_in_repo}"] = buffer.getvalue()
        return buffer.getvalue()

    server.publish = publish
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test downloads into its own base dir and never reads HF_ENDPOINT from the host."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


# -----------------------------------------------------------------------------------------------
# Fixture tables in the real schemas

def gsm8k_table() -> pa.Table:
    return pa.table({
        "question": ["Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                     "clips in May. How many clips did Natalia sell altogether in April and May?",
                     "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
                     "babysitting. How much did she earn?"],
        "answer": ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                   "clips altogether in April and May.\n#### 72",
                   "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
                   "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"],
    }, schema=pa.schema([("question", pa.string()), ("answer", pa.string())]))


MMLU_ROWS = [
    ("What is the chemical symbol for sodium?", "high_school_chemistry", ["Na", "S", "So", "Sd"], 0),
    ("Which planet is closest to the Sun?", "astronomy", ["Venus", "Mercury", "Earth", "Mars"], 1),
    ("What is 7 * 8?", "elementary_mathematics", ["54", "56", "58", "64"], 1),
    ("Who wrote 'On the Origin of Species'?", "high_school_biology", ["Darwin", "Mendel", "Lamarck", "Wallace"], 0),
    ("Which organ produces insulin?", "anatomy", ["Liver", "Kidney", "Pancreas", "Spleen"], 2),
    ("What is the derivative of x^2?", "college_mathematics", ["x", "2", "x^2/2", "2x"], 3),
    ("Which gas do plants take in?", "high_school_biology", ["Carbon dioxide", "Oxygen", "Nitrogen", "Helium"], 0),
    ("How many sides does a hexagon have?", "elementary_mathematics", ["5", "7", "8", "6"], 3),
]
MMLU_FIELDS = [("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
               ("answer", pa.int64())]


def mmlu_test_table() -> pa.Table:
    columns = list(zip(*MMLU_ROWS))
    return pa.table({name: list(values) for (name, _), values in zip(MMLU_FIELDS, columns)},
                    schema=pa.schema(MMLU_FIELDS))


def mmlu_auxiliary_table() -> pa.Table:
    """The auxiliary_train file: one struct column 'train' whose fields are answer, choices,
    question, subject (in that order, as in the real file)."""
    struct_type = pa.struct([("answer", pa.int64()), ("choices", pa.list_(pa.string())),
                             ("question", pa.string()), ("subject", pa.string())])
    rows = [{"answer": 2, "choices": ["red", "green", "blue", "black"], "question": "The sky on a clear day is",
             "subject": ""},
            {"answer": 0, "choices": ["ice", "steam", "sand", "glass"], "question": "Frozen water is called",
             "subject": ""}]
    return pa.table({"train": pa.array(rows, type=struct_type)})


ARC_FIELDS = [("id", pa.string()), ("question", pa.string()),
              ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
              ("answerKey", pa.string())]
ARC_ROWS = [
    ("Mercury_7175875", "An astronomer observes that a planet rotates faster after a meteorite impact. "
     "Which is the most likely effect of this increase in rotation?",
     {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
               "Planetary days will become shorter.", "Planetary gravity will become stronger."],
      "label": ["A", "B", "C", "D"]}, "C"),
    ("NYSEDREGENTS_2015_4_8", "Which tool is best for measuring the mass of a rock?",
     {"text": ["ruler", "balance", "thermometer", "graduated cylinder"], "label": ["1", "2", "3", "4"]}, "2"),
    ("Mercury_SC_401169", "Which of these is a source of light?",
     {"text": ["the Moon", "a mirror", "the Sun"], "label": ["A", "B", "C"]}, "C"),
    ("ACTAAP_2010_5_1", "What do plants need to make food?",
     {"text": ["sunlight", "soil", "rocks", "wind", "snow"], "label": ["A", "B", "C", "D", "E"]}, "A"),
]


def arc_table(rows=ARC_ROWS) -> pa.Table:
    columns = list(zip(*rows))
    return pa.table({name: list(values) for (name, _), values in zip(ARC_FIELDS, columns)},
                    schema=pa.schema(ARC_FIELDS))


HUMANEVAL_PROMPT = '''from typing import List


def running_max(numbers: List[int]) -> List[int]:
    """ From a list of integers, return the list of the largest element seen so far at each position.
    >>> running_max([1, 3, 2, 5, 4])
    [1, 3, 3, 5, 5]
    """
'''
HUMANEVAL_SOLUTION = '''    result, best = [], None
    for n in numbers:
        best = n if best is None else max(best, n)
        result.append(best)
    return result
'''
HUMANEVAL_TEST = '''

METADATA = {
    'author': 'nanochat',
    'dataset': 'test'
}


def check(candidate):
    assert candidate([]) == []
    assert candidate([1, 2, 3, 4]) == [1, 2, 3, 4]
    assert candidate([4, 3, 2, 1]) == [4, 4, 4, 4]
    assert candidate([3, 2, 3, 100, 3]) == [3, 3, 3, 100, 100]
'''


# A prompt with a comment above its import and a helper function before the one to complete.
HELPER_PROMPT = '''# doubling
import math


def twice(x):
    return 2 * x


def double_all(xs):
    """ Double every number of xs. """
'''


def humaneval_table() -> pa.Table:
    return pa.table({"task_id": ["HumanEval/9"], "prompt": [HUMANEVAL_PROMPT],
                     "canonical_solution": [HUMANEVAL_SOLUTION], "test": [HUMANEVAL_TEST],
                     "entry_point": ["running_max"]})


SMOLTALK_MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))


def smoltalk_table(tag: str, count: int) -> pa.Table:
    conversations = []
    for i in range(count):
        conversation = [{"content": f"{tag} question {i}", "role": "user"},
                        {"content": f"{tag} answer {i}", "role": "assistant"}]
        if i % 2:
            conversation.insert(0, {"content": "You are a helpful assistant.", "role": "system"})
        conversations.append(conversation)
    return pa.table({"messages": pa.array(conversations, type=SMOLTALK_MESSAGES),
                     "source": ["smol-magpie-ultra"] * count})


# -----------------------------------------------------------------------------------------------
# The downloader

def test_real_urls_follow_the_hub_layout():
    assert hf_file_url("openai/gsm8k", "main/test-00000-of-00001.parquet") == \
        "https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet"
    assert hf_file_url("cais/mmlu", "all/test-00000-of-00001.parquet", "http://127.0.0.1:9/") == \
        "http://127.0.0.1:9/datasets/cais/mmlu/resolve/main/all/test-00000-of-00001.parquet"


def test_download_is_cached(hub, tmp_path):
    data = hub.publish("openai/gsm8k", "main/test-00000-of-00001.parquet", gsm8k_table())
    path = download_hf_file("openai/gsm8k", "main/test-00000-of-00001.parquet", hub.base_url)
    assert path == str(tmp_path / "task_data" / "openai__gsm8k" / "main" / "test-00000-of-00001.parquet")
    assert open(path, "rb").read() == data
    assert download_hf_file("openai/gsm8k", "main/test-00000-of-00001.parquet", hub.base_url) == path
    assert len(hub.requests) == 1
    assert not os.path.exists(path + ".part")


def test_download_resumes_a_partial_file(hub):
    data = hub.publish("openai/gsm8k", "main/test-00000-of-00001.parquet", gsm8k_table())
    final = task_data_path("openai/gsm8k", "main/test-00000-of-00001.parquet")
    os.makedirs(os.path.dirname(final))
    with open(final + ".part", "wb") as f:
        f.write(data[:100])
    download_hf_file("openai/gsm8k", "main/test-00000-of-00001.parquet", hub.base_url)
    assert hub.requests[0][1] == "bytes=100-"
    assert open(final, "rb").read() == data


def test_download_retries_server_errors_and_cut_transfers(hub):
    data = hub.publish("openai/gsm8k", "main/train-00000-of-00001.parquet", gsm8k_table())
    url_path = "/datasets/openai/gsm8k/resolve/main/main/train-00000-of-00001.parquet"
    hub.failures[url_path] = [503, "truncate"]
    path = download_hf_file("openai/gsm8k", "main/train-00000-of-00001.parquet", hub.base_url, backoff_s=0)
    assert open(path, "rb").read() == data
    # 503, then a cut transfer, then a resume of the half that arrived.
    assert [r for _, r in hub.requests] == [None, None, f"bytes={len(data) // 2}-"]


def test_download_errors_are_final_and_explained(hub):
    with pytest.raises(FileNotFoundError, match="HTTP 404"):
        download_hf_file("openai/gsm8k", "main/nope.parquet", hub.base_url, backoff_s=0)
    hub.publish("openai/gsm8k", "main/x.parquet", gsm8k_table())
    hub.failures["/datasets/openai/gsm8k/resolve/main/main/x.parquet"] = [403]
    with pytest.raises(DatasetDownloadError, match="HTTP 403"):
        download_hf_file("openai/gsm8k", "main/x.parquet", hub.base_url, backoff_s=0)
    hub.failures["/datasets/openai/gsm8k/resolve/main/main/x.parquet"] = [503, 503]
    with pytest.raises(DatasetDownloadError, match="after 2 attempts"):
        download_hf_file("openai/gsm8k", "main/x.parquet", hub.base_url, retries=1, backoff_s=0)
    assert not os.path.exists(task_data_path("openai/gsm8k", "main/x.parquet"))


def test_a_file_in_the_wrong_schema_is_reported(hub):
    hub.publish("openai/gsm8k", "main/test-00000-of-00001.parquet", pa.table({"text": ["hello"]}))
    with pytest.raises(ValueError, match=r"lacks the columns \['question', 'answer'\]"):
        GSM8K("test", base_url=hub.base_url)


# -----------------------------------------------------------------------------------------------
# Loaders

def test_gsm8k_loader(hub):
    hub.publish("openai/gsm8k", "main/train-00000-of-00001.parquet", gsm8k_table())
    task = GSM8K("train", base_url=hub.base_url, shuffle_seed=None)
    assert len(task) == 2 and task.eval_type == "generative"
    weng = task[1]
    assert weng["messages"][0]["content"].startswith("Weng earns $12")
    assert weng["messages"][1]["content"] == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $"},
        {"type": "python", "text": "0.2*50"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"},
    ]
    assert task.evaluate(weng, "She earned 10 dollars.\n#### 10") is True
    assert task.evaluate(weng, "#### 10.00") is False  # nanochat's exact matching by default
    lenient = GSM8K("train", base_url=hub.base_url, shuffle_seed=None, answer_matching="lenient")
    assert lenient.evaluate(weng, "#### 10.00") is True
    assert task.evaluate(weng, "#### 600") is False
    assert task.evaluate(weng, "10") is False


def test_mmlu_loaders_read_the_test_file_and_the_nested_auxiliary_file(hub):
    hub.publish("cais/mmlu", "all/test-00000-of-00001.parquet", mmlu_test_table())
    hub.publish("cais/mmlu", "auxiliary_train/train-00000-of-00001.parquet", mmlu_auxiliary_table())
    test = MMLU("test", base_url=hub.base_url)
    assert len(test) == 8 and test.eval_type == "categorical"
    by_question = {c["messages"][0]["content"].split("\n")[0]: c for c in test}
    sodium = by_question["Multiple Choice question: What is the chemical symbol for sodium?"]
    # nanochat's layout (its tasks/common.py render_mc): each letter after its choice, after "=".
    assert sodium["messages"][0]["content"] == (
        "Multiple Choice question: What is the chemical symbol for sodium?\n- Na=A\n- S=B\n- So=C\n- Sd=D\n\n"
        "Respond only with the letter of the correct answer.")
    assert sodium["messages"][1]["content"] == "A"
    assert sodium["letters"] == ["A", "B", "C", "D"] and sodium["subject"] == "high_school_chemistry"
    # The shuffle is fixed by the seed and is not the file order.
    assert [c["messages"][1]["content"] for c in MMLU("test", base_url=hub.base_url)] == \
        [c["messages"][1]["content"] for c in test]
    assert [c["subject"] for c in MMLU("test", base_url=hub.base_url, shuffle_seed=None)] == \
        [row[1] for row in MMLU_ROWS]

    train = MMLU("train", base_url=hub.base_url, shuffle_seed=None)
    assert [c["messages"][1]["content"] for c in train] == ["C", "A"]
    assert train[0]["messages"][0]["content"].startswith("Multiple Choice question: The sky on a clear day is\n- red=A\n")


def test_arc_loader_keeps_each_question_s_own_labels_as_nanochat_does(hub):
    hub.publish("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet", arc_table())
    task = ARC("ARC-Challenge", "test", base_url=hub.base_url, shuffle_seed=None)
    assert len(task) == 4
    assert [c["messages"][1]["content"] for c in task] == ["C", "2", "C", "A"]
    assert [c["letters"] for c in task] == [list("ABCD"), list("1234"), list("ABC"), list("ABCDE")]
    assert task[1]["messages"][0]["content"] == (
        "Multiple Choice question: Which tool is best for measuring the mass of a rock?\n"
        "- ruler=1\n- balance=2\n- thermometer=3\n- graduated cylinder=4\n\n"
        "Respond only with the letter of the correct answer.")
    # nanochat's verdicts: the answer key is right, any other label wrong (a letter the question
    # does not show too).
    assert task.evaluate(task[1], "2") is True
    assert task.evaluate(task[1], "1") is False and task.evaluate(task[1], "B") is False
    with pytest.raises(ValueError, match="subset 'ARC-Hard' does not exist"):
        ARC("ARC-Hard", "test", base_url=hub.base_url)


def test_smoltalk_loader_joins_the_four_train_files(hub):
    for index in range(4):
        hub.publish("HuggingFaceTB/smol-smoltalk", f"data/train-{index:05d}-of-00004.parquet",
                    smoltalk_table(f"file{index}", 3))
    hub.publish("HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet", smoltalk_table("test", 2))
    train = SmolTalk("train", base_url=hub.base_url)
    assert len(train) == 12 and train.eval_type is None
    questions = sorted(m["content"] for c in train for m in c["messages"] if m["role"] == "user")
    assert questions == sorted(f"file{f} question {i}" for f in range(4) for i in range(3))
    test = SmolTalk("test", base_url=hub.base_url, shuffle_seed=None)
    assert test[1] == {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                    {"role": "user", "content": "test question 1"},
                                    {"role": "assistant", "content": "test answer 1"}]}


def test_registry_passes_base_url_and_view_to_the_loaders(hub):
    hub.publish("allenai/ai2_arc", "ARC-Easy/validation-00000-of-00001.parquet", arc_table())
    task = get_task("arc-easy", "validation", base_url=hub.base_url, stop=3)
    assert isinstance(task, ARC) and task.subset == "ARC-Easy" and len(task) == 3


# -----------------------------------------------------------------------------------------------
# Known-answer-key evaluation

def accuracy(task, answer_for) -> float:
    return sum(task.evaluate(c, answer_for(c)) for c in task) / len(task)


@pytest.mark.parametrize("dataset", ["mmlu", "arc"])
def test_known_answer_key_gives_the_known_score(hub, dataset):
    if dataset == "mmlu":
        hub.publish("cais/mmlu", "all/test-00000-of-00001.parquet", mmlu_test_table())
        task = MMLU("test", base_url=hub.base_url)
        key = ["ABCD"[row[3]] for row in MMLU_ROWS]
    else:
        hub.publish("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet", arc_table())
        task = ARC("ARC-Easy", "test", base_url=hub.base_url)
        key = ["C", "2", "C", "A"]
    share_of_a = key.count("A") / len(key)
    assert 0 < share_of_a < 1
    assert accuracy(task, lambda c: c["messages"][-1]["content"]) == 1.0
    assert accuracy(task, lambda c: "A") == share_of_a
    assert accuracy(task, lambda c: " A\n") == share_of_a  # surrounding space does not matter
    assert accuracy(task, lambda c: "Z") == 0.0
    assert task.reward(task[0], task[0]["messages"][-1]["content"]) == 1.0


def test_gsm8k_known_answer_key(hub):
    hub.publish("openai/gsm8k", "main/test-00000-of-00001.parquet", gsm8k_table())
    task = GSM8K("test", base_url=hub.base_url)
    key = {"Natalia": "72", "Weng": "10"}

    def right(conversation):
        return f"#### {key[conversation['messages'][0]['content'].split()[0]]}"

    assert accuracy(task, right) == 1.0
    assert accuracy(task, lambda c: "#### 72") == 0.5


# -----------------------------------------------------------------------------------------------
# HumanEval

def test_humaneval_scores_completions_by_running_the_tests(hub):
    hub.publish("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet", humaneval_table())
    task = get_task("humaneval", "test", base_url=hub.base_url)
    assert len(task) == 1 and task.eval_type == "generative"
    problem = task[0]
    assert problem["entry_point"] == "running_max" and problem["task_id"] == "HumanEval/9"
    assert task.harness == "nanochat"
    # nanochat's verdicts (its tasks/humaneval.py: the prompt's imports, the answer's first ``` or
    # ```python block or else the whole answer, stripped, then the tests): the reference answer and
    # a whole function pass, the prompt's imports included (List is not imported by the answer).
    assert task.evaluate(problem, problem["messages"][1]["content"]) is True
    fenced = ("Here is the function:\n```python\ndef running_max(numbers: List[int]) -> List[int]:\n"
              "    out = []\n    for i in range(len(numbers)):\n        out.append(max(numbers[:i + 1]))\n"
              "    return out\n```\nIt keeps the running maximum.")
    assert task.evaluate(problem, fenced) is True
    # A bare body fails: the prompt's unfinished def is not in nanochat's program. So does a block
    # fenced as ```py, which nanochat does not read as a block (the whole answer is run).
    assert task.evaluate(problem, HUMANEVAL_SOLUTION) is False
    assert task.evaluate(problem, fenced.replace("```python", "```py")) is False
    # Wrong answers fail: a wrong result, and code that does not run.
    wrong = "```python\ndef running_max(numbers: List[int]) -> List[int]:\n    return sorted(numbers)\n```"
    assert task.evaluate(problem, wrong) is False
    assert task.evaluate(problem, "I do not know.") is False
    assert task.reward(problem, wrong) == 0.0
    # The lenient harness, an explicit option, runs the whole prompt first: the bare body and the
    # ```py block pass there.
    lenient = get_task("humaneval", "test", base_url=hub.base_url, harness="lenient")
    assert lenient.evaluate(problem, HUMANEVAL_SOLUTION) is True
    assert lenient.evaluate(problem, fenced.replace("```python", "```py")) is True
    assert lenient.evaluate(problem, wrong) is False
    # A prompt's helper function is not in nanochat's program, its imports are.
    helper_problem = {"messages": [{"role": "user", "content": HELPER_PROMPT}], "entry_point": "double_all",
                      "test": "def check(candidate):\n    assert candidate([1, 4]) == [2, 8]\n"}
    uses_helper = "```python\ndef double_all(xs):\n    return [twice(x) for x in xs]\n```"
    uses_import = "```python\ndef double_all(xs):\n    return [int(math.fsum([x, x])) for x in xs]\n```"
    assert task.evaluate(helper_problem, uses_helper) is False
    assert task.evaluate(helper_problem, uses_import) is True
    assert lenient.evaluate(helper_problem, uses_helper) is True
    with pytest.raises(ValueError, match="harness='loose': choose one of nanochat, lenient"):
        get_task("humaneval", "test", base_url=hub.base_url, harness="loose")
    # require_sandbox: the answer runs only where every kernel layer of the sandbox holds.
    strict = get_task("humaneval", "test", base_url=hub.base_url, require_sandbox=True)
    missing = execute_code("pass").missing_layers
    if missing:
        with pytest.raises(SandboxUnavailableError, match=missing[0]):
            strict.evaluate(problem, fenced)
    else:
        assert strict.evaluate(problem, fenced) is True
