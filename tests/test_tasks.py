"""Tasks that need no download: slicing, mixtures and sequences, the GSM8K annotation conversion,
the offline generators (arithmetic, SpellingBee, identity, and MultiTurn's chains of them),
CustomJSON's line-numbered errors, the task registry, and the final-answer rule."""

import json
import re

import pytest

from nanochat.calculator import use_calculator
from nanochat.tasks import TASKS, get_task
from nanochat.tasks.arithmetic import Arithmetic, make_problem, split_of_problem
from nanochat.tasks.common import (FinalAnswerTask, Task, TaskMixture, TaskSequence, extract_exact_final_answer,
                                   extract_final_answer)
from nanochat.tasks.customjson import CustomJSON, CustomJSONError
from nanochat.tasks.gsm8k import assistant_parts_from_solution, conversation_from_problem
from nanochat.tasks.identity import GREETINGS, THANKS, TOPICS, Identity
from nanochat.tasks.multiturn import MultiTurn
from nanochat.tasks.spellingbee import SpellingBee, count_letter_conversation, documentation_words, is_test_word
from nanochat.tokenizer import Tokenizer


class Numbers(Task):
    """A task whose example i is a conversation that names (tag, i): easy to trace through views."""

    def __init__(self, tag: str, size: int, **view):
        super().__init__(**view)
        self.tag, self.size = tag, size

    def num_examples(self):
        return self.size

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": self.tag},
                             {"role": "assistant", "content": str(index)}]}


def ids(task) -> list[tuple[str, int]]:
    return [(c["messages"][0]["content"], int(c["messages"][1]["content"])) for c in task]


# -----------------------------------------------------------------------------------------------
# Slicing


def test_view_from_constructor_arguments():
    task = Numbers("n", 10, start=2, stop=9, step=3)
    assert len(task) == 3
    assert ids(task) == [("n", 2), ("n", 5), ("n", 8)]
    assert task[-1] == task[2] == Numbers("n", 10)[8]


def test_stop_past_the_end_is_clipped():
    assert len(Numbers("n", 5, stop=100)) == 5
    assert len(Numbers("n", 5, start=7)) == 0


def test_slices_compose_like_python_ranges():
    task = Numbers("n", 20)
    view = task[3:17:2][1:5][::2]
    assert [i for _, i in ids(view)] == list(range(20))[3:17:2][1:5][::2] == [5, 9]
    assert len(task[100:]) == 0
    assert [i for _, i in ids(task[-3:])] == [17, 18, 19]


def test_bad_views_and_indices_are_explained():
    with pytest.raises(ValueError, match="start=-1"):
        Numbers("n", 5, start=-1)
    with pytest.raises(ValueError, match="step=0"):
        Numbers("n", 5, step=0)
    with pytest.raises(ValueError, match="stop=1 must be"):
        Numbers("n", 5, start=3, stop=1)
    with pytest.raises(IndexError, match="index 5 is out of range"):
        Numbers("n", 5)[5]
    with pytest.raises(ValueError, match="positive step"):
        Numbers("n", 5)[::-1]
    with pytest.raises(TypeError, match="ints or slices"):
        Numbers("n", 5)["0"]


def test_training_only_task_refuses_evaluation():
    with pytest.raises(TypeError, match="no evaluation rule"):
        Numbers("n", 1).evaluate(Numbers("n", 1)[0], "0")


# -----------------------------------------------------------------------------------------------
# Mixtures and sequences


def test_sequence_concatenates_members_in_order():
    sequence = TaskSequence([Numbers("a", 3), Numbers("b", 10, start=5, stop=7)])
    assert len(sequence) == 5
    assert ids(sequence) == [("a", 0), ("a", 1), ("a", 2), ("b", 5), ("b", 6)]
    assert ids(sequence[2:4]) == [("a", 2), ("b", 5)]


def test_mixture_holds_every_member_example_once_in_a_fixed_shuffle():
    members = [Numbers("a", 30), Numbers("b", 20, step=2), Numbers("c", 5)]
    mixture = TaskMixture(members)
    assert len(mixture) == 30 + 10 + 5
    expected = sorted(ids(members[0]) + ids(members[1]) + ids(members[2]))
    assert sorted(ids(mixture)) == expected
    assert ids(mixture) != expected  # shuffled ...
    assert ids(TaskMixture(members)) == ids(mixture)  # ... the same way every time
    assert ids(TaskMixture(members, seed=7)) != ids(mixture)
    # Indexing, slicing and iteration agree.
    assert [mixture[i] for i in range(len(mixture))] == list(mixture)
    assert ids(mixture[10:20]) == ids(mixture)[10:20]
    # Both kinds of members are spread over the whole order, not kept in blocks.
    first_half = [tag for tag, _ in ids(mixture)[:22]]
    assert first_half.count("a") > 5 and first_half.count("b") > 1


def test_mixture_oversamples_a_task_passed_twice():
    small = Numbers("s", 4)
    mixture = TaskMixture([Numbers("a", 8), small, small])
    assert len(mixture) == 16
    assert sorted(i for tag, i in ids(mixture) if tag == "s") == [0, 0, 1, 1, 2, 2, 3, 3]


def test_mixture_rejects_non_tasks():
    with pytest.raises(ValueError, match="at least one task"):
        TaskMixture([])
    with pytest.raises(ValueError, match="takes Task objects"):
        TaskMixture([Numbers("a", 2), [1, 2]])


# -----------------------------------------------------------------------------------------------
# GSM8K format


GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_gsm8k_annotations_become_python_calls_with_outputs():
    assert assistant_parts_from_solution(GSM8K_SOLUTION) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    # An annotation without its result gets the calculator's.
    assert assistant_parts_from_solution("Pay <<3*4>>12.") == [
        {"type": "text", "text": "Pay "}, {"type": "python", "text": "3*4"},
        {"type": "python_output", "text": "12"}, {"type": "text", "text": "12."}]


def test_gsm8k_conversation_renders_with_tool_tokens():
    tokenizer = Tokenizer.train_from_iterator(iter([GSM8K_SOLUTION * 3]), vocab_size=300)
    conversation = conversation_from_problem("How many clips did Natalia sell?", GSM8K_SOLUTION)
    ids_, mask = tokenizer.render_conversation(conversation)
    text = tokenizer.decode(ids_)
    assert "<|python_start|>48/2<|python_end|><|output_start|>24<|output_end|>" in text
    # The tool's output is not trained on; the call is.
    output_start = ids_.index(tokenizer.encode_special("<|output_start|>"))
    python_start = ids_.index(tokenizer.encode_special("<|python_start|>"))
    assert mask[output_start] == 0 and mask[python_start] == 1


def test_final_answer_extraction_normalizes_numbers():
    assert extract_final_answer("so\n#### 1,200") == "1200"
    assert extract_final_answer("#### 12.50 dollars") == "12.5"
    assert extract_final_answer("####-3") == "-3"
    assert extract_final_answer("#### $7") == "7"
    assert extract_final_answer("#### 5 then #### 6") == "5"
    assert extract_final_answer("the answer is 5") is None


class OneProblem(FinalAnswerTask):
    """One GSM8K-format problem whose worked solution ends with `gold`'s "####" line."""

    def __init__(self, gold: str, **options):
        super().__init__(**options)
        self.gold = gold

    def num_examples(self):
        return 1

    def get_example(self, index):
        return conversation_from_problem("How many?", f"It is 6*7 = <<6*7={self.gold}>>{self.gold}.\n#### {self.gold}")


# (model output, gold, nanochat's verdict): read off nanochat's tasks/gsm8k.py, which takes the run
# of [-0-9.,] after the first "#### " (one space) in both texts, drops the commas, and compares the
# strings, in evaluation and as the RL reward alike.
NANOCHAT_GSM8K_VERDICTS = [
    ("#### 42", "42", True),
    ("Six sevens are 42.\n#### 42", "42", True),
    ("#### 42.0", "42", False),          # equal numbers, different strings
    ("#### 42.", "42", False),           # the sentence's full stop is part of the run
    ("####42", "42", False),             # no space after the marker: no answer at all
    ("####  42", "42", False),           # two spaces: no answer either
    ("#### $42", "42", False),
    ("#### 1,200", "1200", True),        # commas are dropped
    ("#### 12,00", "1200", True),        # wherever they are
    ("#### -3", "-3", True),
    ("#### 42 or #### 7", "42", True),   # the first answer counts
    ("#### 7 or #### 42", "42", False),
    ("#### many\n#### 42", "42", True),  # the first "#### " followed by a number
    ("42", "42", False),
    ("#### 10.00", "10.00", True),
]


@pytest.mark.parametrize("output, gold, verdict", NANOCHAT_GSM8K_VERDICTS)
def test_final_answers_are_matched_exactly_as_nanochat_does_by_default(output, gold, verdict):
    task = OneProblem(gold)
    assert task.answer_matching == "exact"
    assert task.evaluate(task[0], output) is verdict
    assert task.reward(task[0], output) == float(verdict)  # RL's reward follows the same rule


def test_lenient_answer_matching_is_an_explicit_option_that_compares_numbers():
    task = OneProblem("42", answer_matching="lenient")
    for output in ("#### 42.0", "####42", "#### $42", "#### 42."):
        assert task.evaluate(task[0], output) is True, output
    assert task.evaluate(task[0], "#### 7 or #### 42") is False
    assert extract_exact_final_answer("#### 1,200.50 dollars") == "1200.50"
    with pytest.raises(ValueError, match="answer_matching='fuzzy': choose one of exact, lenient"):
        OneProblem("42", answer_matching="fuzzy")
    # The offline tasks take the option too, and their slices keep it.
    assert Arithmetic("test", size=4, answer_matching="lenient")[:2].answer_matching == "lenient"
    assert SpellingBee("test", size=4).answer_matching == "exact"


# -----------------------------------------------------------------------------------------------
# Arithmetic word problems


def check_calculator_chain(conversation) -> int:
    """Recompute every tool call with the calculator, check each number a call uses comes from
    the question or an earlier output, and return the final answer, checked against the last output."""
    question = conversation["messages"][0]["content"]
    parts = conversation["messages"][1]["content"]
    known = set(re.findall(r"\d+", question)) | ({"2"} if "half" in question else set())
    outputs = []
    for call, output in zip(parts, parts[1:]):
        if call["type"] != "python":
            continue
        assert output["type"] == "python_output"
        assert use_calculator(call["text"]) == output["text"]
        assert set(re.findall(r"\d+", call["text"])) <= known, (call, question)
        # The text after the output writes its value as a whole number (a division's "24.0" as 24).
        value = parts[parts.index(output) + 1]["text"].split()[0].rstrip(".")
        assert float(value) == float(output["text"]) and value.isdigit()
        known.add(value)
        outputs.append(value)
    answer = extract_final_answer(parts[-1]["text"])
    assert outputs and answer == outputs[-1]
    return int(answer)


def test_arithmetic_answers_are_exact_and_grounded_in_the_question():
    task = Arithmetic("train", size=200)
    answers = [check_calculator_chain(conversation) for conversation in task]
    assert all(answer >= 0 for answer in answers)
    assert len(set(answers)) > 50
    # Every kind of story shows up.
    first_words = {c["messages"][1]["content"][0]["text"].split()[0] for c in task}
    assert len(first_words) >= 6


def test_arithmetic_is_deterministic_and_splits_do_not_overlap():
    assert list(Arithmetic("test", size=30)) == list(Arithmetic("test", size=30))
    assert list(Arithmetic("train", size=30, seed=1)) != list(Arithmetic("train", size=30))

    def math_of(conversation):
        """What a problem asks, without the names and objects: its numbers and its calculations."""
        numbers = tuple(re.findall(r"\d+", conversation["messages"][0]["content"]))
        calls = tuple(p["text"] for p in conversation["messages"][1]["content"] if p["type"] == "python")
        return numbers, calls

    train = {math_of(c) for c in Arithmetic("train", size=2000)}
    test = {math_of(c) for c in Arithmetic("test", size=500)}
    assert len(test) > 400 and not train & test  # few repeats, and none across the splits
    question, solution = make_problem("test", 3)
    assert conversation_from_problem(question, solution) == Arithmetic("test", size=5)[3]
    assert split_of_problem("distance", (12, 9)) == split_of_problem("distance", (12, 9))
    assert {split_of_problem("share", (n, 3)) for n in range(100)} == {"train", "test"}


def test_arithmetic_evaluate_and_reward():
    task = Arithmetic("test", size=20)
    conversation = task[0]
    answer = extract_final_answer(conversation["messages"][1]["content"][-1]["text"])
    assert task.evaluate(conversation, f"I think... #### {answer}") is True
    assert task.evaluate(conversation, f"#### {int(answer) + 1}") is False
    assert task.evaluate(conversation, "no idea") is False
    assert task.reward(conversation, f"#### {answer}") == 1.0
    assert task.reward(conversation, "#### -1") == 0.0


# -----------------------------------------------------------------------------------------------
# SpellingBee


def test_spellingbee_counts_are_right_and_use_the_calculator_form():
    task = SpellingBee("train", size=150)
    zero_counts = 0
    for conversation in task:
        parts = conversation["messages"][1]["content"]
        call = next(p["text"] for p in parts if p["type"] == "python")
        output = next((p["text"] for p in parts if p["type"] == "python_output"), None)
        word, letter = re.fullmatch(r'"([a-z]+)"\.count\("([a-z])"\)', call).groups()
        assert word in conversation["messages"][0]["content"]
        # The tool's output, or none where the calculator refuses the word, as at run time.
        assert use_calculator(call) == output
        assert output in (None, str(word.count(letter)))
        assert extract_final_answer(parts[-1]["text"]) == str(word.count(letter))
        assert task.evaluate(conversation, f"#### {word.count(letter)}")
        # The hand count in the spelled-out text agrees too.
        assert f"I get {word.count(letter)}." in parts[0]["text"]
        zero_counts += word.count(letter) == 0
    assert 0 < zero_counts < 60
    # nanochat's calculator refuses "directory" (it holds "dir"): the call gets no output part.
    refused = count_letter_conversation("directory", "r", "How many {letter} are in {word}?")
    assert [p["type"] for p in refused["messages"][1]["content"]] == ["text", "python", "text"]


def test_spellingbee_words_split_by_hash_and_examples_are_deterministic():
    words = documentation_words()
    assert len(words) > 500 and all(w.isalpha() and w.islower() for w in words)
    train, test = SpellingBee("train", size=5), SpellingBee("test", size=5)
    assert set(train.words).isdisjoint(test.words)
    assert all(is_test_word(w) for w in test.words)
    assert 0.05 < len(test.words) / len(words) < 0.15
    assert list(SpellingBee("test", size=20)) == list(SpellingBee("test", size=20))
    own = SpellingBee("train", size=3, words=["Banana", "cherry", "apple", "kiwi", "lemon", "mango"])
    assert set(own.words) <= {"banana", "cherry", "apple", "kiwi", "lemon", "mango"}
    with pytest.raises(ValueError, match="ASCII letters only"):
        SpellingBee(words=["ok", "not ok"])


# -----------------------------------------------------------------------------------------------
# Identity and CustomJSON


def test_identity_conversations_are_valid_deterministic_and_about_this_project():
    tokenizer = Tokenizer.train_from_iterator(iter(["nanochat on Ray"]), vocab_size=270)
    task = Identity(size=40)
    conversations = list(task)
    assert conversations == list(Identity(size=40))
    assert len({json.dumps(c) for c in conversations}) >= 36  # a rare repeat is harmless
    asked = {m["content"] for c in conversations for m in c["messages"] if m["role"] == "user"}
    assert len(asked) > 25
    assert all(asked & set(questions) for questions, _ in TOPICS.values())  # every topic is covered
    for conversation in conversations:
        tokenizer.render_conversation(conversation)  # raises on a malformed conversation
    text = json.dumps(conversations)
    assert "nanochat on Ray" in text and "Ray" in text
    # Without small talk: the same questions about the model, the greetings and thanks left out.
    small_talk = set(GREETINGS) | set(THANKS)
    assert list(Identity(size=40, with_small_talk=False)) == [
        {"messages": [m for pair in zip(c["messages"][::2], c["messages"][1::2]) if pair[0]["content"] not in small_talk
                      for m in pair]} for c in conversations]
    with pytest.raises(ValueError, match="only split is 'train'"):
        Identity("test")


def test_multiturn_chains_offline_exchanges_with_small_talk_only_at_the_ends():
    tokenizer = Tokenizer.train_from_iterator(iter(["nanochat on Ray"]), vocab_size=270)
    task = MultiTurn("train", size=60, max_parts=5)
    conversations = list(task)
    assert conversations == list(MultiTurn("train", size=60, max_parts=5))
    assert conversations != list(MultiTurn("train", size=60, max_parts=5, seed=1))
    kinds = set()
    for conversation in conversations:
        messages = conversation["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        users = [m["content"] for m in messages if m["role"] == "user"]
        middle = users[1:-1]
        assert not any(u in GREETINGS or u in THANKS for u in middle)
        chained = [u for u in users if u not in GREETINGS and u not in THANKS]
        assert 2 <= len(chained) <= 3 * 5  # an identity member brings up to 3 questions of its own
        kinds.add("small talk" if len(chained) < len(users) else "none")
        kinds.update("tool call" if isinstance(m["content"], list) else "plain answer"
                     for m in messages if m["role"] == "assistant")
        tokenizer.render_conversation(conversation)  # raises on a malformed conversation
    assert kinds == {"small talk", "none", "tool call", "plain answer"}
    assert max(len(c["messages"]) for c in conversations) >= 10


def test_multiturn_test_split_holds_only_test_problems(monkeypatch):
    monkeypatch.setattr("nanochat.tasks.multiturn.MEMBER_POOL", 50)  # small enough to list every member question
    test_questions = {c["messages"][0]["content"] for task in (Arithmetic("test", size=50), SpellingBee("test", size=50))
                      for c in task}
    chained = {m["content"] for c in MultiTurn("test", size=40) for m in c["messages"]
               if m["role"] == "user" and m["content"] not in GREETINGS and m["content"] not in THANKS}
    assert len(chained) > 40 and chained <= test_questions
    with pytest.raises(ValueError, match="max_parts=1"):
        MultiTurn(max_parts=1)
    with pytest.raises(ValueError, match="split 'dev' does not exist"):
        MultiTurn("dev")


def test_customjson_reads_both_line_forms(tmp_path):
    path = tmp_path / "conversations.jsonl"
    lines = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                                        {"type": "python_output", "text": "4"},
                                                        {"type": "text", "text": "4"}]}]},
    ]
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    task = CustomJSON(str(path))
    assert len(task) == 2
    assert task[0] == {"messages": lines[0]}
    assert task[1] == lines[1]


def test_customjson_reports_every_bad_line_with_its_number(tmp_path):
    good = json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        good,                                                            # 1
        "{not json",                                                     # 2
        json.dumps([{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]),  # 3
        good,                                                            # 4
        json.dumps([{"role": "user", "content": "only a question"}]),   # 5
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}),  # 6
    ]) + "\n")
    with pytest.raises(CustomJSONError) as caught:
        CustomJSON(str(path))
    assert [number for number, _ in caught.value.problems] == [2, 3, 5, 6]
    message = str(caught.value)
    assert "line 2: not valid JSON" in message
    assert "line 3: message 0 has role 'assistant' where 'user' is expected" in message
    assert "line 5:" in message and "line 6: message 0 has content of type int" in message
    with pytest.raises(FileNotFoundError, match="no conversations file"):
        CustomJSON(str(tmp_path / "missing.jsonl"))


# -----------------------------------------------------------------------------------------------
# Registry


def test_registry_builds_offline_tasks_by_name(tmp_path):
    assert set(TASKS) == {"smoltalk", "mmlu", "arc-easy", "arc-challenge", "gsm8k", "humaneval",
                          "spellingbee", "arithmetic", "identity", "multiturn", "customjson"}
    assert len(get_task("arithmetic", "test", size=7)) == 7
    assert get_task("spellingbee", "train", size=4, stop=2).eval_type == "generative"
    assert len(get_task("identity", "train", size=12, start=2)) == 10
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]))
    assert len(get_task("customjson", "train", filepath=str(path))) == 1
    with pytest.raises(ValueError, match="needs filepath"):
        get_task("customjson", "train")
    with pytest.raises(ValueError, match="unknown task 'mmlu-pro'"):
        get_task("mmlu-pro", "test")
    with pytest.raises(ValueError, match="split 'dev' does not exist"):
        get_task("arithmetic", "dev")
