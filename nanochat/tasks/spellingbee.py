"""SpellingBee: "how many r are in strawberry?", answered by spelling the word out, counting, and
checking the count with the python tool ("strawberry".count("r")), then "#### 3".

A small model sees tokens, not letters, so counting letters is hard for it; this synthetic task
teaches it to spell a word letter by letter and to lean on the tool, and measures how well it
does. Every example is made from its index: the same split, seed and index always give the same
conversation, in any process, with no download.

The words are the English words of the Python documentation that ships with every interpreter:
the texts of pydoc's topics (the language reference that help() shows), split into lowercase
words of 3 to 14 letters, keeping those that occur at least twice (that drops most typos and
one-off identifiers). That is about 1,900 words on Python 3.11; other Python versions give a
slightly different list, so compare scores within one environment. Pass `words` to use a list
of your own. A word belongs to the test split or to the training split by a hash of the word, so
the model is tested on words it never counted in training.
"""

import collections
import hashlib
import random
import re
import string
from functools import lru_cache

from nanochat.calculator import use_calculator
from nanochat.dataset import pydoc_topic_texts
from nanochat.tasks.common import FinalAnswerTask

SPLITS = ("train", "test")
TEST_SHARE_PERCENT = 10
_WORD = re.compile(r"(?<![\w.])[a-z]{3,14}(?![\w.(])")

QUESTION_TEMPLATES = (
    "How many {letter} are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the letter {letter} in {word}.",
    "how many {letter}s in {word}",
    "In the word {word}, how many times do you see {letter}?",
    "What is the number of {letter} letters in {word}?",
    "Tell me how often {letter} occurs in {word}.",
    "{word}: how many {letter}?",
    "Can you count how many {letter} there are in {word}?",
    "Number of {letter} in {word}?",
)


@lru_cache(maxsize=1)
def documentation_words() -> tuple[str, ...]:
    """The default word list: sorted words of the pydoc topics that occur at least twice."""
    counts = collections.Counter()
    for text in pydoc_topic_texts(min_chars=1):
        counts.update(_WORD.findall(text))
    words = tuple(sorted(word for word, count in counts.items() if count >= 2))
    if not words:
        raise RuntimeError("this Python has no pydoc topics to take words from; pass "
                           "SpellingBee(words=[...]) with a word list of your own")
    return words


def is_test_word(word: str) -> bool:
    """Whether `word` belongs to the test split (about TEST_SHARE_PERCENT percent of words)."""
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < TEST_SHARE_PERCENT


def count_letter_conversation(word: str, letter: str, question_template: str) -> dict:
    """The conversation that counts `letter` in `word`: spelled out, counted, checked with python."""
    count = word.count(letter)
    lines = [f"Let me spell {word} one letter at a time and count the {letter}:"]
    running = 0
    for position, character in enumerate(word, 1):
        if character == letter:
            running += 1
            lines.append(f"{position}. {character} <- {letter} number {running}")
        else:
            lines.append(f"{position}. {character}")
    lines.append(f"Counting by hand I get {running}. Let me check with Python: ")
    call = f'"{word}".count("{letter}")'
    # The output is the tool's, as the engine will force it in; the calculator refuses a word that
    # holds one of nanochat's refused words ("directory" holds "dir"), and then no output follows.
    output = use_calculator(call)
    parts = [
        {"type": "text", "text": "\n".join(lines)},
        {"type": "python", "text": call},
        *([] if output is None else [{"type": "python_output", "text": output}]),
        {"type": "text", "text": f"\nThe word {word} has {count} {letter}.\n#### {count}"},
    ]
    return {"messages": [{"role": "user", "content": question_template.format(letter=letter, word=word)},
                         {"role": "assistant", "content": parts}]}


class SpellingBee(FinalAnswerTask):
    """`size` letter-counting problems of one split, made from their index and `seed`."""

    def __init__(self, split: str = "train", size: int = 1000, seed: int = 0,
                 words: list[str] | None = None, **view):
        super().__init__(**view)
        if split not in SPLITS:
            raise ValueError(f"SpellingBee split {split!r} does not exist: choose one of {SPLITS}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size={size!r} must be a positive int (the number of problems to make)")
        candidates = documentation_words() if words is None else words
        bad = [w for w in candidates if not (isinstance(w, str) and w.isalpha() and w.isascii())]
        if bad:
            raise ValueError(f"SpellingBee words must be ASCII letters only; {len(bad)} are not, "
                             f"e.g. {bad[0]!r}")
        self.words = sorted({w.lower() for w in candidates if is_test_word(w.lower()) == (split == "test")})
        if not self.words:
            raise ValueError(f"none of the {len(candidates)} words falls in the {split!r} split; "
                             "pass a longer word list")
        self.split, self.size, self.seed = split, size, seed

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        # A string seed goes through SHA-512 in random.seed, so it does not depend on PYTHONHASHSEED.
        rng = random.Random(f"spellingbee/{self.split}/{self.seed}/{index}")
        word = rng.choice(self.words)
        # Mostly letters of the word; sometimes one it lacks, whose right answer is 0.
        letter = rng.choice(word) if rng.random() < 0.85 else rng.choice(string.ascii_lowercase)
        template = rng.choice(QUESTION_TEMPLATES)
        return count_letter_conversation(word, letter, template)
