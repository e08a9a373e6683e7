"""The calculator tool: what the chat model's text between <|python_start|> and <|python_end|>
evaluates to, as the string the engine feeds back between <|output_start|> and <|output_end|>.

What it accepts and what it answers are nanochat's (its engine.py, use_calculator), so that a
model's tool calls get the same outputs, and so the same token sequences, as they would there:

- Every comma is removed first, inside quotes too: "1,000" is 1000, and '"a,b".count(",")' is
  '"ab".count("")', which is 3.
- Arithmetic: an expression made only of digits, '.', '+', '-', '*', '/', parentheses and spaces,
  without '**' (nanochat refuses powers: no operator but + - * / // and the signs is evaluated).
  So % and powers give no output.
- Letter counting: an expression made only of ASCII letters, digits, quotes, parentheses, '.',
  '_' and spaces, that contains ".count(" and none of nanochat's refused words (IDENTIFIER_WORDS,
  in any case, inside quotes too: "direction".count("i") gives no output).
- The result is Python's str() of the value: 6/3 -> "2.0", 48/2 -> "24.0", 7//2 -> "3",
  0.1+0.2 -> "0.30000000000000004", "strawberry".count("r") -> "3".

None means "no tool output": the engine then forces nothing and the model continues on its own.

Where this differs from nanochat, on purpose: nanochat hands the text to eval(); here nothing is.
The text is parsed with `ast` and only an allow-list of node types is evaluated: int and float
literals, + - * / //, unary + and -, and a string literal's .count() of one string literal (the
form SpellingBee teaches). What else nanochat's filters let through to eval() gives None here:
chains of other string methods ('Ab'.lower().count('a')), which there run arbitrary str methods
and can ask for any amount of memory ('a'.center(10**9) needs no '*'), and the odd non-numbers
"()" and "..." (there "()" and "Ellipsis"). Expressions longer than MAX_EXPRESSION_CHARS give None
as well (nanochat has no such limit; the model's tool calls are a few dozen characters).

The time limit is a deadline checked before every step, which unlike nanochat's SIGALRM works in
any thread (Ray Serve replicas and rollout actors run the engine outside the main thread, where
nanochat's signal-based limit cannot be installed). With no powers and the length limit, every
value has at most a few hundred digits, so each step is far below a millisecond.
"""

import ast
import operator
import time

MAX_EXPRESSION_CHARS = 500
_ARITHMETIC_CHARS = frozenset("0123456789*+-/.() ")
_COUNTING_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
# Text that makes nanochat refuse a letter-counting expression wherever it occurs, compared in
# lower case ("raw_input", also on its list, holds "input").
IDENTIFIER_WORDS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "globals",
                    "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")

_BINARY_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                     ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv}
_UNARY_OPERATORS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Refused(Exception):
    """The expression is outside what the calculator evaluates."""


def use_calculator(expression: str, timeout: float = 1.0) -> str | None:
    """Evaluate a calculator expression; the result as text, or None when refused or invalid."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    expression = expression.replace(",", "")
    characters = set(expression)
    arithmetic = characters <= _ARITHMETIC_CHARS
    if not arithmetic:
        lowered = expression.lower()
        if not characters <= _COUNTING_CHARS or ".count(" not in expression \
                or any(word in lowered for word in IDENTIFIER_WORDS):
            return None
    deadline = time.monotonic() + timeout
    try:
        # Like eval(), which the model's text goes to in nanochat, ignore leading spaces.
        body = ast.parse(expression.lstrip(" "), mode="eval").body
        return str(_arithmetic(body, deadline) if arithmetic else _count(body))
    except (_Refused, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        return None


def _arithmetic(node: ast.AST, deadline: float) -> int | float:
    if time.monotonic() >= deadline:
        raise _Refused("out of time")
    # type() rather than isinstance(): Ellipsis and True are no numbers to the calculator.
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPERATORS:
        return _UNARY_OPERATORS[type(node.op)](_arithmetic(node.operand, deadline))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
        return _BINARY_OPERATORS[type(node.op)](_arithmetic(node.left, deadline),
                                                _arithmetic(node.right, deadline))
    raise _Refused(f"{type(node).__name__} is not supported")


def _count(call: ast.AST) -> int:
    """Only `"literal".count("literal")`, the form the spelling tasks teach."""
    function = getattr(call, "func", None)
    if not (isinstance(call, ast.Call) and isinstance(function, ast.Attribute) and function.attr == "count"
            and _is_string_literal(function.value) and len(call.args) == 1
            and _is_string_literal(call.args[0]) and not call.keywords):
        raise _Refused("the only call allowed is 'string'.count('substring')")
    return function.value.value.count(call.args[0].value)


def _is_string_literal(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is str
