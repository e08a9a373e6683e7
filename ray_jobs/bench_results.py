"""The one machine-readable line every benchmark ends with, per target:

    RESULT <name> <value> target <op> <number> PASS|FAIL

so that scripts (and the README's table) collect figures without parsing the human tables.
"""


def result_line(name: str, value: float, op: str, target: float) -> str:
    """The verdict on one target; `op` is '>=' or '<='."""
    if op not in (">=", "<="):
        raise ValueError(f"a target's op is '>=' or '<=', not {op!r}")
    passed = value >= target if op == ">=" else value <= target
    return f"RESULT {name} {value:.3f} target {op} {target:g} {'PASS' if passed else 'FAIL'}"
