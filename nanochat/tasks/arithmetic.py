"""Arithmetic word problems in the GSM8K format, made up on the spot, with exact answers.

GSM8K needs a download and is hard for a tiny model; this generator gives problems of the same
shape that any machine can make offline, for SFT, RL and evaluation of the tiny preset. A problem
is a short story with whole numbers ("Maya has 23 stamps and buys 4 packs of 6 ..."), and its
solution takes one to three steps, each written as GSM8K writes them, with a calculator
annotation, and ends with the answer line:

    The packs hold 4*6 = <<4*6=24>>24 stamps.
    Maya now has 23+24 = <<23+24=47>>47 stamps.
    #### 47

The tool output in an annotation is what the calculator answers (nanochat's format: a division
gives a float, <<48/2=24.0>>24), so the model sees in training the output it gets at run time.

The solution text then goes through the GSM8K conversion (nanochat.tasks.gsm8k), so the
annotations become python tool calls exactly as for the real set, and scoring is GSM8K's.

Example `index` of a split is made from a random generator seeded by (split, seed, index): the
same arguments give the same problem in every process. The two splits never share a problem:
a problem's numbers (with its kind of story; the names and objects are decoration) are hashed,
and a hash picks the split; a generator draws until it gets a problem of its own split. About
one problem in five belongs to the test split.
"""

import hashlib
import itertools
import random

from nanochat.calculator import use_calculator
from nanochat.tasks.common import FinalAnswerTask
from nanochat.tasks.gsm8k import conversation_from_problem

SPLITS = ("train", "test")
TEST_SHARE_PERCENT = 20

NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kira",
         "Liam", "Maya", "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor",
         "Wen", "Yusuf", "Zoe")
ITEMS = ("apples", "stickers", "marbles", "cookies", "pencils", "stamps", "cards", "books",
         "shells", "beads", "crayons", "buttons")
GOODS = ("notebooks", "sandwiches", "toy cars", "plants", "tickets", "mugs", "kites", "puzzles")
VEHICLES = ("train", "bus", "truck", "car", "boat", "cyclist")
EXPENSES = ("rent", "groceries", "a new bike", "books", "a concert ticket", "gifts")


def _step(expression: str, value: int) -> str:
    """One calculator step in GSM8K's notation, expression = <<expression=output>>value, where the
    output is the calculator's, as the engine forces it in at run time ("24.0" for 48/2, whose
    value the text then writes as 24)."""
    return f"{expression} = <<{expression}={use_calculator(expression)}>>{value}"


def _packs(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    have, packs, per_pack = rng.randint(5, 99), rng.randint(2, 9), rng.randint(2, 12)
    in_packs = packs * per_pack
    total = have + in_packs
    question = (f"{name} has {have} {item}. {name} buys {packs} packs with {per_pack} {item} in each "
                f"pack. How many {item} does {name} have now?")
    solution = (f"The packs hold {_step(f'{packs}*{per_pack}', in_packs)} {item}.\n"
                f"{name} now has {_step(f'{have}+{in_packs}', total)} {item}.\n#### {total}")
    return (have, packs, per_pack), question, solution


def _change(rng):
    name, good = rng.choice(NAMES), rng.choice(GOODS)
    count, price = rng.randint(2, 9), rng.randint(2, 25)
    cost = count * price
    bill = next(b for b in (20, 50, 100, 200, 500) if b > cost)
    change = bill - cost
    question = (f"{name} buys {count} {good} that cost ${price} each and pays with a ${bill} bill. "
                f"How many dollars of change does {name} get back?")
    solution = (f"The {good} cost {_step(f'{count}*{price}', cost)} dollars.\n"
                f"The change is {_step(f'{bill}-{cost}', change)} dollars.\n#### {change}")
    return (count, price, bill), question, solution


def _share(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 12), rng.randint(2, 25)
    total = friends * each
    question = (f"{name} has {total} {item} and shares them equally among {friends} friends. "
                f"How many {item} does each friend get?")
    solution = f"Each friend gets {_step(f'{total}/{friends}', each)} {item}.\n#### {each}"
    return (total, friends), question, solution


def _distance(rng):
    vehicle = rng.choice(VEHICLES)
    speed, hours = rng.randint(3, 90), rng.randint(2, 12)
    distance = speed * hours
    question = (f"A {vehicle} travels at {speed} miles per hour for {hours} hours. "
                f"How many miles does it travel?")
    solution = f"It travels {_step(f'{speed}*{hours}', distance)} miles.\n#### {distance}"
    return (speed, hours), question, solution


def _wages(rng):
    name, expense = rng.choice(NAMES), rng.choice(EXPENSES)
    wage, hours, days = rng.randint(8, 30), rng.randint(2, 8), rng.randint(2, 6)
    per_day = wage * hours
    earned = per_day * days
    spent = rng.randint(1, earned - 1)
    left = earned - spent
    question = (f"{name} earns ${wage} an hour and works {hours} hours a day for {days} days. "
                f"Then {name} spends ${spent} on {expense}. How many dollars does {name} have left?")
    solution = (f"Each day {name} earns {_step(f'{wage}*{hours}', per_day)} dollars.\n"
                f"In {days} days that is {_step(f'{per_day}*{days}', earned)} dollars.\n"
                f"After spending, {name} has {_step(f'{earned}-{spent}', left)} dollars left.\n#### {left}")
    return (wage, hours, days, spent), question, solution


def _leftovers(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    given, lost = rng.randint(2, 40), rng.randint(1, 20)
    gone = given + lost
    start = gone + rng.randint(1, 60)
    left = start - gone
    question = (f"{name} had {start} {item}. {name} gave {given} of them to a friend and lost "
                f"{lost}. How many {item} does {name} have left?")
    solution = (f"{name} no longer has {_step(f'{given}+{lost}', gone)} {item}.\n"
                f"That leaves {_step(f'{start}-{gone}', left)} {item}.\n#### {left}")
    return (start, given, lost), question, solution


def _seats(rng):
    rows, per_row = rng.randint(3, 25), rng.randint(4, 20)
    seats = rows * per_row
    taken = rng.randint(1, seats - 1)
    free = seats - taken
    question = (f"A hall has {rows} rows of chairs with {per_row} chairs in each row. "
                f"{taken} chairs are taken. How many chairs are free?")
    solution = (f"The hall has {_step(f'{rows}*{per_row}', seats)} chairs.\n"
                f"Free chairs: {_step(f'{seats}-{taken}', free)}.\n#### {free}")
    return (rows, per_row, taken), question, solution


def _half_then_spend(rng):
    name, good = rng.choice(NAMES), rng.choice(GOODS)
    half = rng.randint(5, 100)
    money = 2 * half
    spent = rng.randint(1, half - 1)
    left = half - spent
    question = (f"{name} had ${money} and spent half of it on {good}, then ${spent} on lunch. "
                f"How many dollars does {name} have now?")
    solution = (f"Half of the money is {_step(f'{money}/2', half)} dollars.\n"
                f"After lunch {name} has {_step(f'{half}-{spent}', left)} dollars.\n#### {left}")
    return (money, spent), question, solution


STORIES = {
    "packs": _packs, "change": _change, "share": _share, "distance": _distance, "wages": _wages,
    "leftovers": _leftovers, "seats": _seats, "half_then_spend": _half_then_spend,
}


def split_of_problem(story: str, numbers: tuple) -> str:
    """'test' or 'train': the split a problem belongs to, from a hash of its story and numbers."""
    key = f"{story}:{','.join(map(str, numbers))}".encode("utf-8")
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    return "test" if value % 100 < TEST_SHARE_PERCENT else "train"


def make_problem(split: str, index: int, seed: int = 0) -> tuple[str, str]:
    """(question, GSM8K-format solution) of problem `index` of a split."""
    if split not in SPLITS:
        raise ValueError(f"Arithmetic split {split!r} does not exist: choose one of {SPLITS}")
    # A fifth of all problems are test problems, so this ends after a few draws.
    for attempt in itertools.count():
        # A string seed goes through SHA-512 in random.seed, so it does not depend on PYTHONHASHSEED.
        rng = random.Random(f"arithmetic/{split}/{seed}/{index}/{attempt}")
        story = rng.choice(sorted(STORIES))
        numbers, question, solution = STORIES[story](rng)
        if split_of_problem(story, numbers) == split:
            return question, solution


class Arithmetic(FinalAnswerTask):
    """`size` arithmetic word problems of one split, made from their index and `seed`."""

    def __init__(self, split: str = "train", size: int = 1000, seed: int = 0, **view):
        super().__init__(**view)
        if split not in SPLITS:
            raise ValueError(f"Arithmetic split {split!r} does not exist: choose one of {SPLITS}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size={size!r} must be a positive int (the number of problems to make)")
        self.split, self.size, self.seed = split, size, seed

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        return conversation_from_problem(*make_problem(self.split, index, self.seed))
