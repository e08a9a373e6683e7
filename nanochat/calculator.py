"""The calculator tool: what the chat model's text between <|python_start|> and <|python_end|>
evaluates to, as the string the engine feeds back between <|output_start|> and <|output_end|>.

The model writes things like `48/2`, `(12 + 8) * 3 % 7` or `"strawberry".count("r")`. Nothing is
handed to eval(): the text is parsed with `ast` and only an allow-list of node types is
evaluated, namely int and float literals, + - * / // % ** (binary), unary + and -, parentheses,
and a string literal's .count() of one string literal. Anything else (names, other calls or
attributes, subscripts, comprehensions, lambdas, ...) gives None, and so do expressions that
would be expensive: longer than MAX_EXPRESSION_CHARS, an exponent above MAX_EXPONENT, an integer
result above MAX_INTEGER_BITS. Division by zero, overflow and non-finite results give None too.
None means "no tool output": the engine then lets the model continue on its own.

Results read the way a person writes them, because the model was trained on such text (GSM8K's
annotations say 24, not 24.0): ints exactly, floats with at most 15 significant digits and
without a trailing ".0", so 6/3 -> "2", 0.1+0.2 -> "0.3", 7/2 -> "3.5", 1/3 -> "0.333333333333333".
Commas between digits that group thousands ("1,000") are removed first, as the model writes
numbers that way; commas inside string literals are left alone.

The time limit is a deadline checked before every step. The size bounds keep each single step
far below a millisecond, so the deadline is a real limit, and unlike SIGALRM it works in any
thread (Ray Serve replicas and rollout actors run the engine outside the main thread).
"""

import ast
import math
import operator
import re
import time

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 1000
# About 3,000 decimal digits: cheap to multiply and below Python's int-to-str limit (4,300).
MAX_INTEGER_BITS = 10_000
_SIGNIFICANT_DIGITS = 15

_BINARY_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                     ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
                     ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY_OPERATORS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# A string literal (kept as it is) or a comma between digits followed by a group of three.
_STRING_OR_THOUSANDS_COMMA = re.compile(
    r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?<=\d),(?=\d{3}(?!\d))""")


class _Refused(Exception):
    """The expression is outside what the calculator evaluates."""


def use_calculator(expression: str, timeout: float = 1.0) -> str | None:
    """Evaluate a calculator expression; the result as text, or None when refused or invalid."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    expression = _STRING_OR_THOUSANDS_COMMA.sub(lambda match: match.group(1) or "",
                                                expression).strip()
    if not expression:
        return None
    deadline = time.monotonic() + timeout
    try:
        tree = ast.parse(expression, mode="eval")
        value = _evaluate(tree.body, deadline)
    except (_Refused, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        return None
    return _format_number(value)


def _format_number(value: int | float) -> str:
    """An int exactly; a float with 15 significant digits, no trailing '.0', no '-0'."""
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    return format(value, f".{_SIGNIFICANT_DIGITS}g")


def _evaluate(node: ast.AST, deadline: float) -> int | float:
    if time.monotonic() >= deadline:
        raise _Refused("out of time")
    if isinstance(node, ast.Constant):
        return _number(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPERATORS:
        return _UNARY_OPERATORS[type(node.op)](_evaluate(node.operand, deadline))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
        left = _evaluate(node.left, deadline)
        right = _evaluate(node.right, deadline)
        # Only a power can grow far beyond its operands; every other operation on bounded
        # operands is cheap, and its result is checked afterwards.
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _checked_result(_BINARY_OPERATORS[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        return _count(node)
    raise _Refused(f"{type(node).__name__} is not supported")


def _number(value) -> int | float:
    # type() rather than isinstance(): True and False are ints to Python, not to the calculator.
    if type(value) in (int, float):
        return _checked_result(value)
    raise _Refused(f"a {type(value).__name__} literal is not a number")


def _check_power(base, exponent) -> None:
    """Refuse powers whose cost or size is out of bounds, before computing them."""
    if abs(exponent) > MAX_EXPONENT:
        raise _Refused("exponent too large")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if base.bit_length() * exponent > MAX_INTEGER_BITS:
            raise _Refused("power too large")


def _checked_result(value) -> int | float:
    if not isinstance(value, (int, float)):  # e.g. complex, from (-8) ** 0.5
        raise _Refused(f"result is a {type(value).__name__}")
    if isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
        raise _Refused("integer too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused("result is not finite")
    return value


def _count(call: ast.Call) -> int:
    """Only `"literal".count("literal")`, the form the spelling tasks teach."""
    function = call.func
    if not (isinstance(function, ast.Attribute) and function.attr == "count"
            and _is_string_literal(function.value) and len(call.args) == 1
            and _is_string_literal(call.args[0]) and not call.keywords):
        raise _Refused("the only call allowed is 'string'.count('substring')")
    return function.value.value.count(call.args[0].value)


def _is_string_literal(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is str
