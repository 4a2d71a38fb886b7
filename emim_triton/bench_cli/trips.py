"""How many times each loop of a Triton kernel runs at one launch, read from the kernel's Python source.

The static cost model finds loops in the SASS (by back-edges) and needs their trip counts at a shape.
They come from the kernel itself, not from a per-kernel table: the kernel's source is parsed, and the
bounds of each ``for ... in range(...)`` / ``tl.range(...)`` are evaluated with the launch's arguments and
constexprs and the kernel's own straight-line assignments before the loop (``HIDDEN: tl.constexpr =
4 * WINDOW_AREA``). So the K² offset loop gives 49 at K = 7, the MLP loop cdiv(4K², HIDDEN_CHUNK), the
weights kernel's row loop its runtime ``steps`` argument.

What this cannot know, and says so (`SourceLoop.trips` None with the reason): bounds computed from loaded
data or from ``tl.program_id`` (they differ between programs), bounds that depend on an enclosing loop's
variable, ``while`` loops. ``tl.static_range`` loops are unrolled by Triton and leave no loop in the
SASS. A ``tl.range(..., loop_unroll_factor=u)`` runs its SASS loop cdiv(trips, u) times. Loops inside
helper functions are not followed (the EMIM kernels have none).
"""

from __future__ import annotations

import ast
import inspect
import math
import operator
import textwrap
from dataclasses import dataclass

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod, ast.Div: operator.truediv, ast.Pow: operator.pow, ast.LShift: operator.lshift,
           ast.RShift: operator.rshift}
_FUNCTIONS = {"cdiv": lambda a, b: -(-a // b), "min": min, "max": max, "constexpr": lambda x: x,
              "next_power_of_2": lambda n: 1 << (n - 1).bit_length()}
_UNKNOWN = object()


@dataclass(frozen=True)
class SourceLoop:
    """One ``for`` (or ``while``) statement of the kernel, with its trip count at the launch."""

    file: str
    first_line: int  # the `for` line
    last_line: int  # the last line of its body
    text: str  # the `for` line itself, for reports
    trips: int | None  # runs of its body per program at this launch; None if not known statically
    why_unknown: str = ""
    unrolled: bool = False  # tl.static_range: unrolled by Triton, no loop in the SASS

    def contains(self, line: int) -> bool:
        return self.first_line <= line <= self.last_line


def source_loops(kernel, args: dict, constexprs: dict) -> list[SourceLoop]:
    """Every loop of `kernel`'s body (a @triton.jit function) with its trip count at a launch with these
    `args` (numbers are used, tensors ignored) and `constexprs`, in source order."""
    from ..aot import kernel_function

    fn = kernel_function(kernel)
    lines, start = inspect.getsourcelines(fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    body = next(node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))
    env = {name: value for name, value in args.items() if isinstance(value, (bool, int, float))}
    env.update(constexprs)
    found: list[SourceLoop] = []
    _walk(body.body, env, found, inspect.getsourcefile(fn), lines, start - 1)
    return sorted(found, key=lambda loop: loop.first_line)


def innermost_loop(loops: list[SourceLoop], line: int) -> SourceLoop | None:
    """The innermost loop (not unrolled) whose lines contain `line`, or None."""
    around = [loop for loop in loops if loop.contains(line) and not loop.unrolled]
    return max(around, key=lambda loop: loop.first_line, default=None)


def _walk(statements, env: dict, found: list, file: str, lines: list, offset: int) -> None:
    """Follow straight-line assignments through `statements`, recording each loop with `env` as it stands."""
    for node in statements:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and _single_name(node) is not None:
            value = _evaluate(node.value, env) if node.value is not None else _UNKNOWN
            name = _single_name(node)
            if value is _UNKNOWN:
                env.pop(name, None)
            else:
                env[name] = value
            continue
        if isinstance(node, (ast.For, ast.While)):
            trips, why, unrolled = _trips(node, env)
            first, last = node.lineno + offset, node.end_lineno + offset
            text = lines[node.lineno - 1].strip() if node.lineno - 1 < len(lines) else ""
            found.append(SourceLoop(file, first, last, text, trips, why, unrolled))
        # Inside a compound statement names may be reassigned any number of times: they are unknown there
        # (and after it), except what the inner statements themselves assign in straight lines.
        changed = _assigned_names(node)
        for name in changed:
            env.pop(name, None)
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                _walk(inner, dict(env), found, file, lines, offset)


def _trips(node, env: dict) -> tuple[int | None, str, bool]:
    """(trip count or None, why it is unknown, unrolled by Triton) of a loop statement."""
    if isinstance(node, ast.While):
        return None, "a while loop", False
    call = node.iter
    name = _callee(call) if isinstance(call, ast.Call) else None
    if name not in ("range", "static_range"):
        return None, "not a range() loop", False
    bounds = [_evaluate(arg, env) for arg in call.args]
    if not 1 <= len(bounds) <= 3 or any(b is _UNKNOWN or not isinstance(b, int) for b in bounds):
        return None, "its bounds are not known from the launch's arguments and constexprs", name == "static_range"
    start, stop, step = (0, bounds[0], 1) if len(bounds) == 1 else (*bounds[:2], bounds[2] if len(bounds) == 3 else 1)
    if step == 0:
        return None, "range() step 0", False
    trips = max(0, math.ceil((stop - start) / step))
    unroll = next((_evaluate(k.value, env) for k in call.keywords if k.arg == "loop_unroll_factor"), None)
    if isinstance(unroll, int) and unroll > 1:
        trips = -(-trips // unroll)
    return trips, "", name == "static_range"


def _evaluate(node, env: dict):
    """The value of a small arithmetic expression over `env`'s names, or _UNKNOWN."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float, str)):
        return node.value
    if isinstance(node, ast.Name):
        return env.get(node.id, _UNKNOWN)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, env), _evaluate(node.right, env)
        if _UNKNOWN in (left, right):
            return _UNKNOWN
        try:
            return _BINARY[type(node.op)](left, right)
        except (ArithmeticError, TypeError, ValueError):
            return _UNKNOWN
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, env)
        if value is _UNKNOWN or not isinstance(value, (int, float)):
            return _UNKNOWN
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Call) and _callee(node) in _FUNCTIONS and not node.keywords:
        values = [_evaluate(arg, env) for arg in node.args]
        if _UNKNOWN in values:
            return _UNKNOWN
        try:
            return _FUNCTIONS[_callee(node)](*values)
        except (ArithmeticError, TypeError, ValueError):
            return _UNKNOWN
    return _UNKNOWN


def _callee(call: ast.Call) -> str | None:
    """"range" for range(...), tl.range(...) and triton.language.range(...); likewise for other names."""
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _single_name(node) -> str | None:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    if len(targets) == 1 and isinstance(targets[0], ast.Name):
        return targets[0].id
    return None


def _assigned_names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
