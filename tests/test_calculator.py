"""The calculator tool in nanochat/calculator.py: for what the model writes, the output nanochat's
calculator gives (its engine.py use_calculator: the verdicts below were worked out by reading it,
Python's str() of eval's value, or no output), and None, quickly, for everything else."""

import time

import pytest

from nanochat.calculator import MAX_EXPRESSION_CHARS, use_calculator


@pytest.mark.parametrize("expression, expected", [
    ("1 + 2", "3"),
    ("2 + 3 * 4", "14"),
    ("(2 + 3) * 4", "20"),
    ("10 - 4 - 3", "3"),
    # True division gives a float, written as Python writes it, ".0" and all.
    ("48/2", "24.0"),
    ("6 / 3", "2.0"),
    ("100 / 10 / 5", "2.0"),
    ("7 / 2", "3.5"),
    ("1 / 3", "0.3333333333333333"),
    ("0.1 + 0.2", "0.30000000000000004"),
    ("1.1 * 1.1", "1.2100000000000002"),
    ("12.50 * 4", "50.0"),
    ("7 // 2", "3"),
    ("-7 // 2", "-4"),
    ("+5 - -3", "8"),
    ("-0.0", "-0.0"),
    ("48 / 2 * 3 + 12", "84.0"),
    # Every comma goes first: thousands separators, and commas inside quotes.
    ("1,000 + 5", "1005"),
    ("1,234,567 * 2", "2469134"),
    ("(1,2)", "12"),
    ("  3*4  ", "12"),
    ("9" * 400 + ".0", "inf"),
    ('"strawberry".count("r")', "3"),
    ("'banana'.count('an')", "2"),
    ('"a,b,c".count(",")', "4"),  # "abc".count("")
    ('"xyz".count("q")', "0"),
    ('("Tool" "kit").count("o")', "2"),
])
def test_values_are_nanochat_s(expression, expected):
    assert use_calculator(expression) == expected


@pytest.mark.parametrize("expression", [
    # Outside nanochat's arithmetic characters, or a power: no output there either.
    "7 % 3",
    "2 ** 3",
    "2 * 3 ** 2",
    "1e308 * 10",
    "1 < 2",
    "1 << 10",
    "5 ^ 3",
    "1 + 2\n",
    "(1, 2)",
    # Letter counting: a refused word anywhere, an operator, or no .count( at all.
    '"direction".count("i")',
    '"profile".count("f")',
    '"opened".count("e")',
    '"Mississippi".count("s") + 1',
    "'abc'.upper()",
    "'ab'",
    "'ab' * 3",
    "__import__('os')",
    "__import__('os').system('echo hi')",
    "open('x')",
    "import os",
    "(1).__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "[1, 2][0]",
    "lambda: 1",
    "x",
    "x + 1",
    # Characters nanochat allows whose eval fails.
    "'abc'.count(x)",
    "x.count('a')",
    "2(3)",
    "1 / 0",
    "1 // 0",
    "1 +",
    "01",
    "",
    "   ",
    "(" * 300 + "1" + ")" * 300,
    # Allowed by nanochat's filters and run by its eval, refused here on purpose (the module's
    # docstring says why): other string methods, and values that are no numbers.
    "'Ab'.lower().count('a')",
    "'a'.center(9).count(' ')",
    "'abc'.count('a', 1)",
    "()",
    "...",
    "1" + " + 1" * 300,
])
def test_refused(expression):
    assert use_calculator(expression) is None


def test_length_limit_is_at_the_documented_size():
    longest = "1" + "+1" * ((MAX_EXPRESSION_CHARS - 1) // 2)
    assert len(longest) <= MAX_EXPRESSION_CHARS
    assert use_calculator(longest) == str((MAX_EXPRESSION_CHARS - 1) // 2 + 1)
    assert use_calculator(longest + "+1") is None


def test_non_string_input_is_refused():
    assert use_calculator(None) is None
    assert use_calculator(42) is None


def test_hostile_inputs_return_quickly():
    start = time.monotonic()
    for expression in ["9" * 240 + "*" + "9" * 240, "9" * 499 + "/7", "-" * 499 + "1",
                       "(" * 300 + "1" + ")" * 300, "'" + "a" * 480 + "'.count('a')"]:
        use_calculator(expression)
    assert time.monotonic() - start < 1.0


def test_deadline_refuses_when_time_is_up():
    assert use_calculator("1 + 2", timeout=0.0) is None
    assert use_calculator("1 + 2", timeout=1.0) == "3"
