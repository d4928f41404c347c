"""Safe expressions for plans: CEL conditions and `{{ expr }}` templates in step parameters.

Evaluation runs on Google's C++ CEL runtime (`cel-expr-python`) with only CEL's standard
functions: an expression reads the scope it is given and nothing else (no attribute access, no
imports, no files). celpy's parser is used only to inspect an expression before it runs (the
step ids it reads, how deeply it nests, what data it touches); celpy evaluates nothing.

Every evaluation is bounded in time (README "Expressions"):
- a path such as `steps.a.output.items` or `params["x"][0]` is resolved directly, in
  microseconds, whatever the size of the value;
- anything else is priced first from what it reads (the parts of `params`, `vars` and step
  outputs it names), how deeply it nests comprehensions and how much `+` can grow a value; an
  evaluation priced within the budget runs inline, anything else runs in the expression
  sandbox (`orchestrator.server.sandbox`), a separate process that is killed past the budget;
- the runtime itself stops a comprehension after 10,000 iterations and nesting past 32 levels.
Past the budget an evaluation fails "too costly".

Numbers: protobuf `Struct` carries every number as a double. A whole JSON number (3.0) is an
int in expressions and any other number a double, so `steps.a.output.count == 3` and
`params.count + 1` work as written; int and double compare by value (`1.5 < 2`), but
arithmetic needs one type (`params.ratio * 2.0`, `double(params.count) / 2`). Whole doubles
render as integers in text ("n={{ params.n }}" gives "n=3").
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lark
from cel_expr_python import cel
from celpy.celparser import CELParser
from celpy.evaluation import celstr
from google.protobuf import duration_pb2, timestamp_pb2

__all__ = [
    "DEFAULT_BUDGET_SECONDS",
    "Condition",
    "ExpressionError",
    "ExpressionProblem",
    "Scope",
    "Template",
    "compile_condition",
    "compile_template",
    "scope",
]

# Bounds that keep parsing cheap whatever a tenant submits.
MAX_SOURCE_LENGTH = 4096
MAX_COMPREHENSION_DEPTH = 3
MAX_SYNTAX_DEPTH = 400
# The runtime's own bounds (not configurable in cel-expr-python): comprehension iterations per
# evaluation, and nesting of the checked expression.
ITERATION_BUDGET = 10_000

# CPU one evaluation may take (ORCHESTRATOR_EXPRESSION_BUDGET_MS).
DEFAULT_BUDGET_SECONDS = 0.010

_ROOTS = ("params", "vars", "steps")
_COMPREHENSIONS = frozenset({"map", "filter", "all", "exists", "exists_one"})
_EXACT_FLOAT_LIMIT = 2**53
_INT64_LIMIT = 2**63
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_RULE_NAME = re.compile(r"Token\('RULE', '(\w+)'\)")
_STATUS_PREFIX = re.compile(r"^[A-Z_]+: ")
_OVERLOAD = re.compile(r"No matching overloads found : _(\W+)_\((\w+), (\w+)\)")
_TYPE_NAMES = {"int64": "int", "uint64": "uint"}


@dataclass(frozen=True)
class ExpressionProblem:
    """One problem found in a value: where (`url`, `headers.x`, `items[2]`) and what."""

    path: str
    message: str


class ExpressionError(Exception):
    """An expression that does not parse or cannot be evaluated, with a human message.

    `path` locates the first problem inside a templated value ("" for the value itself);
    `problems` lists every problem found (compile_template reports them all at once).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str = "",
        problems: Sequence[ExpressionProblem] = (),
    ) -> None:
        self.message = message
        self.path = path
        self.problems: tuple[ExpressionProblem, ...] = tuple(problems) or (
            ExpressionProblem(path, message),
        )
        text = f"{path}: {message}" if path else message
        if len(self.problems) > 1:
            text += f" (and {len(self.problems) - 1} more)"
        super().__init__(text)


class TooCostly(ExpressionError):
    """An evaluation that would take (or took) more than the budget."""


# --- compiling ---------------------------------------------------------------------------

Key = str | int
Path = tuple[Key, ...]


@dataclass(frozen=True)
class Program:
    """One compiled expression and what inspection found out about it before any run."""

    source: str
    expression: Any  # cel.Expression; None when `path` resolves it directly
    path: Path | None  # the expression is just this path from a root (params, vars, steps)
    reads: tuple[Path, ...]  # the parts of the scope it reads, longest static prefixes
    references: frozenset[str]  # step ids read as steps.<id> / steps["<id>"]
    comprehensions: int  # deepest nesting of map/filter/all/exists/exists_one
    tokens: int  # leaves of the syntax tree: the work of one pass over it
    sized: int  # operators and calls whose cost grows with their operands
    pluses: int  # `+` can grow strings and lists
    literal_items: int  # items of the largest list or map literal (commas + 1)
    # It may read a part of the scope only on some paths: has(), `in`, `?:`, `&&`, `||`
    # (CEL's `&&` and `||` absorb an error when the other side decides).
    guarded: bool = False

    def required_params(self) -> set[str]:
        """The parameters every evaluation reads (`params.x`, `params["x"]`): none for a
        guarded expression, which may read a parameter only when it is there."""
        if self.guarded:
            return set()
        return {
            path[1]
            for path in self.reads
            if path[0] == "params" and len(path) > 1 and isinstance(path[1], str)
        }


# Made once: the C++ environment is immutable and shared by every compiled expression.
_ENV = cel.NewEnv(variables={name: cel.Type.DYN for name in _ROOTS})
_PARSER = CELParser()


@functools.lru_cache(maxsize=4096)
def _compile_cached(source: str) -> Program | str:
    # Failures are cached too (as their message): a bad plan resubmitted in a loop stays cheap.
    if not source.strip():
        return "empty expression"
    if len(source) > MAX_SOURCE_LENGTH:
        return f"expression longer than {MAX_SOURCE_LENGTH} characters"
    try:
        tree = _PARSER.parse(source)
    except Exception as exc:  # lark raises several unrelated types on bad input
        return _syntax_message(exc)
    try:
        program = _inspect(source, tree)
    except ExpressionError as exc:
        return exc.message
    if program.path is not None:
        return program
    try:
        expression = _ENV.compile(source)
    except Exception as exc:  # the C++ checker: unknown names, impossible overloads
        message = str(exc)
        if "found no matching overload" not in message:
            return _compile_message(message)
        # The checker types `dyn * int` as int, so `params.ratio * 2 == 5.0` would not
        # compile although it holds at run time: types are left to the evaluation then.
        try:
            expression = _ENV.compile(source, disable_check=True)
        except Exception as unchecked:
            return _compile_message(str(unchecked))
    return Program(**{**program.__dict__, "expression": expression})


def _compile(source: str) -> Program:
    compiled = _compile_cached(source)
    if isinstance(compiled, str):
        raise ExpressionError(compiled)
    return compiled


def _syntax_message(exc: Exception) -> str:
    line = getattr(exc, "line", None)
    column = getattr(exc, "column", None)
    if isinstance(line, int) and isinstance(column, int) and line > 0:
        where = f"line {line}, column {column}" if line > 1 else f"column {column}"
        return f"syntax error at {where}"
    return "syntax error"


def _compile_message(text: str) -> str:
    # "INVALID_ARGUMENT: ERROR: <input>:1:5: found no matching overload ...\n | source ..."
    first = text.split("\n", 1)[0]
    if "max recursion depth" in first or "recursion limit" in first:
        return "expression is nested too deeply (the runtime allows 32 levels of operators)"
    match = re.search(r"<input>:(\d+):(\d+): (.*)", first)
    if not match:
        return f"invalid expression: {_clip(_STATUS_PREFIX.sub('', first))}"
    line, column, message = match.groups()
    message = message.replace(" (in container '')", "")
    where = f"line {line}, column {column}" if line != "1" else f"column {column}"
    return f"{_clip(message)} (at {where})"


def _clip(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _inspect(source: str, tree: lark.Tree[Any]) -> Program:
    """Enforce the size bounds and find what the expression reads (see Program)."""
    references: set[str] = set()
    reads: list[Path] = []
    deepest = tokens = sized = literal_items = 0
    guarded = False
    stack: list[tuple[lark.Tree[Any], int, int]] = [(tree, 0, 0)]
    while stack:
        node, depth, comprehensions = stack.pop()
        if depth > MAX_SYNTAX_DEPTH:
            raise ExpressionError("expression is nested too deeply")
        kind = node.data
        if kind == "member_dot_arg" and _token(node.children[1]) in _COMPREHENSIONS:
            comprehensions += 1
            deepest = max(deepest, comprehensions)
            if comprehensions > MAX_COMPREHENSION_DEPTH:
                raise ExpressionError(
                    f"more than {MAX_COMPREHENSION_DEPTH} nested comprehensions"
                    " (map, filter, all, exists, exists_one)"
                )
        if kind in ("member_dot_arg", "ident_arg", "dot_ident_arg") or kind.startswith(
            ("relation_", "addition_", "multiplication_")
        ):
            sized += 1
        if kind in ("exprlist", "mapinits"):
            literal_items = max(literal_items, len(node.children))
        if _guards(node):
            guarded = True
        for child in node.children:
            if isinstance(child, lark.Tree):
                stack.append((child, depth + 1, comprehensions))
            elif isinstance(child, lark.Token):
                tokens += 1
    _collect_reads(tree, reads, references)
    return Program(
        source=source,
        expression=None,
        path=_whole_path(tree),
        reads=tuple(reads),
        references=frozenset(references),
        comprehensions=deepest,
        tokens=tokens,
        sized=sized,
        pluses=source.count("+"),
        literal_items=literal_items,
        guarded=guarded,
    )


def _guards(node: lark.Tree[Any]) -> bool:
    """Whether the node makes what is read below it depend on the data (see Program)."""
    kind = node.data
    if kind == "relation_in":
        return True
    if kind in ("expr", "conditionalor", "conditionaland"):
        return len(node.children) > 1
    return kind == "ident_arg" and _token(node.children[0]) == "has"


def _collect_reads(tree: lark.Tree[Any], reads: list[Path], references: set[str]) -> None:
    """Every use of a root as the longest static path from it (`params.a.b`, `steps["x"]`);
    a root used any other way (`size(steps)`, `params[k]`) is read whole from that point."""
    stack: list[lark.Tree[Any]] = [tree]
    while stack:
        node = stack.pop()
        if node.data == "member":
            path = _member_path(node)
            if path is not None:
                reads.append(path)
                if path[0] == "steps" and len(path) > 1 and isinstance(path[1], str):
                    references.add(path[1])
                # The keys are literals; anything else below (a dynamic index) is read whole.
                stack.extend(_dynamic_parts(node))
                continue
        stack.extend(child for child in node.children if isinstance(child, lark.Tree))


def _member_path(node: lark.Tree[Any], *, exact: bool = False) -> Path | None:
    """The static path a `member` chain reads from a root, or None if it starts elsewhere.
    A dynamic index (`params[k]`) ends the path there, or with `exact` makes it None."""
    keys: list[Key] = []
    current: object = node
    while isinstance(current, lark.Tree):
        if current.data == "member":
            current = _only_child(current)
            continue
        if current.data == "member_dot":
            keys.append(str(_token(current.children[1])))
            current = current.children[0]
            continue
        if current.data == "member_index":
            key = _literal_key(current.children[1])
            if key is None and exact:
                return None
            keys = [] if key is None else [*keys, key]
            current = current.children[0]
            continue
        if current.data == "primary":
            name = _token(_only_child(_only_child(current)))
            if name in _ROOTS and _is_ident(current):
                return (str(name), *reversed(keys))
        return None
    return None


def _dynamic_parts(node: lark.Tree[Any]) -> Iterator[lark.Tree[Any]]:
    """The index expressions inside a member chain (they may read roots themselves)."""
    current: object = node
    chain = ("member", "member_dot", "member_index")
    while isinstance(current, lark.Tree) and current.data in chain:
        if current.data == "member_index" and isinstance(current.children[1], lark.Tree):
            yield current.children[1]
        current = current.children[0]


def _is_ident(primary: lark.Tree[Any]) -> bool:
    child = _only_child(primary)
    return isinstance(child, lark.Tree) and child.data == "ident"


def _whole_path(tree: lark.Tree[Any]) -> Path | None:
    """The path the whole expression is, when it is nothing but one (see Program.path)."""
    node: object = tree
    while isinstance(node, lark.Tree) and node.data != "member":
        node = _only_child(node)
    return _member_path(node, exact=True) if isinstance(node, lark.Tree) else None


def _literal_key(node: object) -> Key | None:
    """A string or int literal index (`["id"]`, `[0]`), following the single-child chain."""
    while isinstance(node, lark.Tree) and node.data != "literal":
        node = _only_child(node)
    if not isinstance(node, lark.Tree):
        return None
    literal = _only_child(node)
    if not isinstance(literal, lark.Token):
        return None
    if literal.type in ("STRING_LIT", "MLSTRING_LIT"):
        try:
            return str(celstr(literal))
        except Exception:  # a malformed escape: the evaluation will report it
            return None
    if literal.type == "INT_LIT" and not literal.value.lower().lstrip("-").startswith("0x"):
        return int(literal.value)
    return None


def _token(node: object) -> str | None:
    return str(node.value) if isinstance(node, lark.Token) else None


def _only_child(tree: object) -> lark.Tree[Any] | lark.Token | None:
    if isinstance(tree, lark.Tree) and len(tree.children) == 1:
        child = tree.children[0]
        return child if isinstance(child, lark.Tree | lark.Token) else None
    return None


# --- the scope and what an evaluation reads ----------------------------------------------


@dataclass(frozen=True)
class Scope:
    """What conditions and templates see: `params`, `vars`, `steps.<id>.output`.

    Only steps listed in `steps` exist, so reading the output of a step that did not complete
    is an evaluation error rather than a silent null. Values are plain JSON Python values,
    held by reference: building a Scope costs nothing.
    """

    params: Mapping[str, Any]
    vars: Mapping[str, Any]
    outputs: Mapping[str, Any]
    budget: float = DEFAULT_BUDGET_SECONDS

    def root(self, name: str) -> Any:
        if name == "params":
            return self.params
        if name == "vars":
            return self.vars
        return _StepsView(self.outputs)


class _StepsView(Mapping[str, Any]):
    """`steps` without copying: steps[id] is {"output": the step's output}."""

    def __init__(self, outputs: Mapping[str, Any]) -> None:
        self._outputs = outputs

    def __getitem__(self, key: str) -> Any:
        return {"output": self._outputs[key]}

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)


def scope(
    params: Mapping[str, Any],
    vars: Mapping[str, Any],
    step_outputs: Mapping[str, Any],
    *,
    budget: float = DEFAULT_BUDGET_SECONDS,
) -> Scope:
    """The scope for conditions and templates (see Scope)."""
    return Scope(params, vars, step_outputs, budget)


_MISSING = object()


def _resolve(value: Any, keys: Path, source: str) -> Any:
    """Follow a static path as CEL would (a missing key or index is an error)."""
    for key in keys:
        if isinstance(key, str) and isinstance(value, Mapping):
            found = value.get(key, _MISSING)
            if found is _MISSING:
                raise ExpressionError(f"{source.strip()!r}: no such key: {_clip(key, 100)!r}")
            value = found
        elif isinstance(key, int) and isinstance(value, list | tuple):
            if not -1 < key < len(value):
                raise ExpressionError(f"{source.strip()!r}: index {key} out of range")
            value = value[key]
        else:
            kind = _json_type(value)
            raise ExpressionError(
                f"{source.strip()!r}: cannot select {_clip(str(key), 100)!r} from a {kind}"
            )
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "list" if isinstance(value, list | tuple) else "map"


@dataclass
class _Reading:
    """The pruned activation an evaluation gets, and its measured size."""

    data: dict[str, Any] = field(default_factory=dict)
    nodes: int = 0
    text: int = 0  # characters of strings and keys
    longest: int = 0  # the longest string or list
    complete: bool = True  # False: larger than is measured inline (sandbox)


# Values larger than this many nodes are not measured (nor converted) on the event loop.
INLINE_NODES = 4096


def _read(program: Program, scope: Scope) -> _Reading:
    """Only the parts of the scope the program names, whole numbers as ints (module doc)."""
    reading = _Reading()
    whole: set[Path] = set()
    # Shorter paths first: a value read whole is never also read in part (nor written into).
    for path in sorted(set(program.reads), key=len):
        if any(path[:length] in whole for length in range(1, len(path) + 1)):
            continue
        root = str(path[0])
        value: Any = scope.root(root)
        parent: dict[str, Any] = reading.data
        key = root
        taken: Path = (root,)
        for step in path[1:]:
            if not isinstance(step, str) or not isinstance(value, Mapping):
                break
            parent = parent.setdefault(key, {})
            found = value.get(step, _MISSING)
            if found is _MISSING:
                value = _MISSING
                break
            key, value, taken = step, found, (*taken, step)
        if value is _MISSING:
            continue
        whole.add(taken)
        if isinstance(value, _StepsView):
            value = {step_id: {"output": output} for step_id, output in value.items()}
        if reading.complete:
            converted = _convert(value, reading)
            if converted is not _MISSING:
                parent[key] = converted
                continue
        parent[key] = value
    return reading


def _convert(value: Any, reading: _Reading) -> Any:
    """value with whole floats as ints, counted into `reading`; _MISSING past INLINE_NODES."""
    reading.nodes += 1
    if reading.nodes > INLINE_NODES:
        reading.complete = False
        return _MISSING
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < _EXACT_FLOAT_LIMIT else value
    if isinstance(value, str):
        reading.text += len(value)
        reading.longest = max(reading.longest, len(value))
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_INT64_LIMIT <= value < _INT64_LIMIT else float(value)
    if isinstance(value, Mapping):
        reading.longest = max(reading.longest, len(value))
        out: dict[str, Any] = {}
        for item_key, item in value.items():
            reading.text += len(item_key)
            converted = _convert(item, reading)
            if converted is _MISSING:
                return _MISSING
            out[str(item_key)] = converted
        return out
    if isinstance(value, list | tuple):
        reading.longest = max(reading.longest, len(value))
        items = []
        for item in value:
            converted = _convert(item, reading)
            if converted is _MISSING:
                return _MISSING
            items.append(converted)
        return items
    raise ExpressionError(f"a value of type {type(value).__name__} cannot be used in expressions")


def convert_whole(value: Any) -> Any:
    """The sandbox's conversion: like _read's, with no size limit."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < _EXACT_FLOAT_LIMIT else value
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -_INT64_LIMIT <= value < _INT64_LIMIT else float(value)
    if isinstance(value, Mapping):
        return {str(key): convert_whole(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [convert_whole(item) for item in value]
    return value


# --- the price of an evaluation ------------------------------------------------------------

# Calibrated on this project's bench machine (bench/expressions.py prints the measured
# figures) and doubled: seconds per unit of work in cel-expr-python.
_PER_CALL = 20e-6  # entering the runtime, the activation, the result
_PER_NODE = 0.6e-6  # converting one JSON value into the runtime
_PER_CHAR = 2e-9  # converting one character of a string or key
_PER_STEP = 0.1e-6  # evaluating one node of the expression once
_PER_ITEM = 10e-9  # copying or comparing one character or item


def price(program: Program, reading: _Reading) -> float:
    """An upper bound of the seconds the evaluation takes (only for a complete reading)."""
    # The largest value any operator can see: the largest read or literal, grown by `+`.
    largest = max(reading.longest, len(program.source), program.literal_items)
    growth = (program.pluses + 1) ** max(program.comprehensions, 1)
    iterations = 1
    if program.comprehensions:
        width = max(reading.longest, program.literal_items, 1) * (program.pluses + 1)
        iterations = min(ITERATION_BUDGET, width**program.comprehensions) + 1
    per_pass = program.tokens * _PER_STEP + program.sized * largest * growth * _PER_ITEM
    return float(
        _PER_CALL + reading.nodes * _PER_NODE + reading.text * _PER_CHAR + iterations * per_pass
    )


# --- evaluating ----------------------------------------------------------------------------


def evaluate_in_runtime(program: Program, data: Mapping[str, Any]) -> Any:
    """Run the compiled expression on a prepared activation; the result as plain Python."""
    try:
        value = program.expression.eval(data=data)
    except RuntimeError as exc:
        text = str(exc)
        if "Iteration budget exceeded" in text:
            raise TooCostly(
                f"{program.source.strip()[:80]!r}: too costly to evaluate (more than "
                f"{ITERATION_BUDGET:,} comprehension iterations)"
            ) from None
        raise ExpressionError(f"{program.source.strip()!r}: {_eval_message(text)}") from None
    if value.type() == cel.Type.ERROR:
        raise ExpressionError(f"{program.source.strip()!r}: {_eval_message(str(value.value()))}")
    return value.plain_value()


def _eval_message(text: str) -> str:
    text = _STATUS_PREFIX.sub("", text.split("\n", 1)[0]).removesuffix(" [INTERNAL]")
    overload = _OVERLOAD.search(text)
    if overload:
        operator, left, right = overload.groups()
        left, right = _TYPE_NAMES.get(left, left), _TYPE_NAMES.get(right, right)
        text = f"no operator {operator!r} for ({left}, {right})"
        if {left, right} == {"int", "double"}:
            text += "; make both doubles, e.g. 2.0 or double(x)"
    text = _RULE_NAME.sub(r"'\1'", text)
    return _clip(text.replace("Key not found in map : ", "no such key: "))


def _too_costly(program: Program, seconds: float, budget: float) -> TooCostly:
    return TooCostly(
        f"{program.source.strip()[:80]!r}: too costly to evaluate (about {seconds * 1000:,.1f} ms;"
        f" the budget is {budget * 1000:g} ms)"
    )


class Evaluation:
    """One program's evaluation in one scope: resolved directly, inline, or (when it cannot
    be priced within the budget) handed to `Sandbox.evaluate` by the async callers."""

    def __init__(self, program: Program, scope: Scope) -> None:
        self.program = program
        self.scope = scope
        self.reading: _Reading | None = None

    def direct(self) -> tuple[bool, Any]:
        """(True, value) when it can be evaluated within the budget here; (False, None) when
        it has to go to the sandbox (then `sandbox_data` is what it needs)."""
        program = self.program
        if program.path is not None:
            root = self.scope.root(str(program.path[0]))
            value = _resolve(root, program.path[1:], program.source)
            if isinstance(value, _StepsView):
                value = {step_id: {"output": output} for step_id, output in value.items()}
            return True, value
        reading = _read(program, self.scope)
        self.reading = reading
        if not reading.complete:
            return False, None
        seconds = price(program, reading)
        if seconds > self.scope.budget:
            return False, None
        return True, evaluate_in_runtime(program, reading.data)

    def sandbox_data(self) -> dict[str, Any]:
        assert self.reading is not None
        return self.reading.data


def evaluate(program: Program, scope: Scope) -> Any:
    """Evaluate here or fail too costly: the synchronous path (no sandbox)."""
    evaluation = Evaluation(program, scope)
    done, value = evaluation.direct()
    if not done:
        reading = evaluation.reading
        seconds = price(program, reading) if reading and reading.complete else float("inf")
        raise _too_costly(program, seconds, scope.budget)
    return value


# --- values out ----------------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    """Runtime values → plain JSON Python values (dict, list, str, int, float, bool, None)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ExpressionError(f"result {value} is not a finite number")
        return value
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, datetime.datetime):
        timestamp = timestamp_pb2.Timestamp()
        timestamp.FromDatetime(value)
        return timestamp.ToJsonString()
    if isinstance(value, datetime.timedelta):
        duration = duration_pb2.Duration()
        duration.FromTimedelta(value)
        return duration.ToJsonString()
    if isinstance(value, Mapping):
        return {_json_key(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(item) for item in value]
    raise ExpressionError(f"a result of type {type(value).__name__} has no JSON form")


def _json_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, str | int):
        return str(key)
    raise ExpressionError(f"a map key of type {type(key).__name__} has no JSON form")


# --- conditions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A compiled CEL condition; `evaluate` returns its bool value."""

    source: str
    program: Program

    def evaluate(self, scope: Scope) -> bool:
        """The condition's value in `scope`; ExpressionError on an error or a non-bool."""
        return self.check(evaluate(self.program, scope))

    def check(self, result: Any) -> bool:
        """The evaluated value as the condition's answer (it must be a bool)."""
        if not isinstance(result, bool):
            raise ExpressionError(
                f"{self.source.strip()!r}: a condition must be a bool, got {_json_type(result)}"
            )
        return result

    def references(self) -> set[str]:
        """Step ids the condition reads as `steps.<id>` or `steps["<id>"]`."""
        return set(self.program.references)


def compile_condition(source: str) -> Condition:
    """Compile a CEL condition; ExpressionError if it does not parse."""
    try:
        program = _compile(source)
    except ExpressionError as exc:
        raise ExpressionError(f"{source.strip()!r}: {exc.message}") from None
    return Condition(source, program)


# --- templates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Whole:
    """A string that is exactly one `{{ expr }}`: renders to the value, keeping its type."""

    program: Program


@dataclass(frozen=True)
class _Interpolated:
    """Literal text and expressions, rendered as text and joined."""

    parts: tuple[str | Program, ...]


@dataclass(frozen=True)
class _Object:
    items: tuple[tuple[str, _Node], ...]


@dataclass(frozen=True)
class _Array:
    items: tuple[_Node, ...]


@dataclass(frozen=True)
class _Literal:
    value: str | int | float | bool | None


_Node = _Whole | _Interpolated | _Object | _Array | _Literal


@dataclass(frozen=True)
class Template:
    """A JSON-like value whose strings may hold `{{ expr }}` templates, compiled once."""

    _root: _Node

    def render(self, scope: Scope) -> Any:
        """The value with every template resolved in `scope`, as plain JSON Python values."""
        results: dict[int, Any] = {}
        for path, program in self.programs():
            if id(program) not in results:
                try:
                    results[id(program)] = evaluate(program, scope)
                except ExpressionError as exc:
                    raise ExpressionError(exc.message, path=path) from None
        return self.build(results)

    def programs(self) -> Iterator[tuple[str, Program]]:
        """Each expression with the path of the value it sits in, in rendering order."""
        for path, node in _walk(self._root, ""):
            if isinstance(node, _Whole):
                yield path, node.program
            elif isinstance(node, _Interpolated):
                for part in node.parts:
                    if isinstance(part, Program):
                        yield path, part

    def build(self, results: Mapping[int, Any]) -> Any:
        """The rendered value from each program's result (keyed by id(program))."""
        return _build(self._root, results, "")

    def references(self) -> set[str]:
        """Step ids referenced as `steps.<id>` or `steps["<id>"]` anywhere in the value."""
        found: set[str] = set()
        for refs in self.references_by_path().values():
            found |= refs
        return found

    def references_by_path(self) -> dict[str, set[str]]:
        """For each templated string that reads steps, its path in the value and those ids."""
        found: dict[str, set[str]] = {}
        for path, program in self.programs():
            if program.references:
                found.setdefault(path, set()).update(program.references)
        return found


def _walk(node: _Node, path: str) -> Iterator[tuple[str, _Node]]:
    yield path, node
    if isinstance(node, _Object):
        for key, child in node.items:
            yield from _walk(child, _join(path, key))
    elif isinstance(node, _Array):
        for index, child in enumerate(node.items):
            yield from _walk(child, f"{path}[{index}]")


def _join(path: str, key: str) -> str:
    # Keys that would be ambiguous after a dot are quoted, e.g. headers["content.type"].
    part = key if _PLAIN_KEY.fullmatch(key) else f"[{json.dumps(key, ensure_ascii=False)}]"
    if part.startswith("[") or not path:
        return f"{path}{part}"
    return f"{path}.{part}"


def compile_template(value: Any) -> Template:
    """Compile every `{{ expr }}` in a JSON-like value; ExpressionError lists every problem."""
    problems: list[ExpressionProblem] = []
    root = _compile_node(value, "", problems, depth=0)
    if problems:
        first = problems[0]
        raise ExpressionError(first.message, path=first.path, problems=problems)
    return Template(root)


_MAX_VALUE_DEPTH = 100


def _compile_node(value: Any, path: str, problems: list[ExpressionProblem], depth: int) -> _Node:
    if depth > _MAX_VALUE_DEPTH:
        problems.append(ExpressionProblem(path, "value is nested too deeply"))
        return _Literal(None)
    if isinstance(value, str):
        return _compile_string(value, path, problems)
    if value is None or isinstance(value, bool | int | float):
        return _Literal(value)
    if isinstance(value, Mapping):
        items: list[tuple[str, _Node]] = []
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(ExpressionProblem(path, f"map key {key!r} is not a string"))
                continue
            items.append((key, _compile_node(item, _join(path, key), problems, depth + 1)))
        return _Object(tuple(items))
    if isinstance(value, list | tuple):
        return _Array(
            tuple(
                _compile_node(item, f"{path}[{index}]", problems, depth + 1)
                for index, item in enumerate(value)
            )
        )
    problems.append(ExpressionProblem(path, f"unsupported value of type {type(value).__name__}"))
    return _Literal(None)


def _compile_string(text: str, path: str, problems: list[ExpressionProblem]) -> _Node:
    try:
        pieces = _split(text)
    except ExpressionError as exc:
        problems.append(ExpressionProblem(path, exc.message))
        return _Literal(text)
    parts: list[str | Program] = []
    failed = False
    for piece in pieces:
        if isinstance(piece, str):
            parts.append(piece)
            continue
        try:
            parts.append(_compile(piece.source))
        except ExpressionError as exc:
            problems.append(ExpressionProblem(path, f"{{{{{piece.source}}}}}: {exc.message}"))
            failed = True
    if failed:
        return _Literal(text)
    if not any(isinstance(part, Program) for part in parts):
        return _Literal(text)
    if len(parts) == 1 and isinstance(parts[0], Program):
        return _Whole(parts[0])
    return _Interpolated(tuple(parts))


@dataclass(frozen=True)
class _Source:
    source: str


def _split(text: str) -> list[str | _Source]:
    """Split text into literal pieces and `{{ ... }}` expression sources.

    The closing `}}` is looked for outside CEL string literals and map braces, so
    `{{ {'a': {'b': 1}} }}` and `{{ '}}' }}` work; a literal `{{` is written `{{ '{{' }}`.
    A `}}` outside any template is plain text.
    """
    pieces: list[str | _Source] = []
    position = 0
    while True:
        start = text.find("{{", position)
        if start < 0:
            if position < len(text):
                pieces.append(text[position:])
            return pieces
        if start > position:
            pieces.append(text[position:start])
        end = _closing(text, start + 2)
        if end < 0:
            raise ExpressionError(f"'{{{{' at offset {start} has no matching '}}}}'")
        pieces.append(_Source(text[start + 2 : end]))
        position = end + 2


def _closing(text: str, index: int) -> int:
    """Index of the `}}` closing an expression starting at `index`, or -1."""
    depth = 0
    length = len(text)
    while index < length:
        char = text[index]
        if char in "'\"":
            index = _skip_string(text, index)
            continue
        if char == "}" and depth == 0 and text.startswith("}}", index):
            return index
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        index += 1
    return -1


def _skip_string(text: str, index: int) -> int:
    """Index just past the CEL string literal opening at `index` (len(text) if unterminated)."""
    quote = text[index]
    delimiter = quote * 3 if text.startswith(quote * 3, index) else quote
    index += len(delimiter)
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text.startswith(delimiter, index):
            return index + len(delimiter)
        index += 1
    return len(text)


def _build(node: _Node, results: Mapping[int, Any], path: str) -> Any:
    if isinstance(node, _Literal):
        return node.value
    if isinstance(node, _Object):
        return {key: _build(child, results, _join(path, key)) for key, child in node.items}
    if isinstance(node, _Array):
        return [_build(child, results, f"{path}[{i}]") for i, child in enumerate(node.items)]
    try:
        if isinstance(node, _Whole):
            return _result(node.program, results)
        return "".join(
            part if isinstance(part, str) else _as_text(_result(part, results))
            for part in node.parts
        )
    except ExpressionError as exc:
        raise ExpressionError(exc.message, path=path) from None


def _result(program: Program, results: Mapping[int, Any]) -> Any:
    # A path's value is the scope's own JSON value, passed on as it is (no copy).
    value = results[id(program)]
    return value if program.path is not None else _to_json(value)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(
        _whole_numbers_as_ints(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _whole_numbers_as_ints(value: Any) -> Any:
    # Struct turns every number into a double; text should read "3" as JSON.stringify writes it.
    if isinstance(value, float) and value.is_integer() and abs(value) < _EXACT_FLOAT_LIMIT:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_ints(item) for item in value]
    return value
