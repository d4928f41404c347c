"""Safe expressions for plans: CEL conditions and `{{ expr }}` templates in step parameters.

Only CEL is evaluated, with celpy's interpreter (never its transpiler, which `exec`s generated
Python) and only CEL's standard functions (the numeric operators below are replaced by pure
functions of their operands), so an expression can read the scope it is given and nothing
else: no attribute access, no imports, no files, no unbounded loops.

Numbers: protobuf `Struct` carries every number as a double, while celpy keeps `int` and
`double` apart, so `steps.a.output.count == 3` (3.0 == 3) would be a "no matching overload"
error. Values keep their type (a double stays a double, so the same expression never changes
meaning with the data: `a / b` is always double division when a and b come from JSON). Instead
the numeric operators are made JSON-friendly:
- `==`, `!=`, `<`, `<=`, `>`, `>=` compare int, uint and double by numeric value, as the
  current CEL spec defines (celpy predates it);
- `+`, `-`, `*`, `/` with an int and a double compute in double (a deliberate extension, so
  that `params.count + 1` works). Integer-only arithmetic is unchanged (`7 / 2 == 3`).
Whole doubles render as integers in text ("n={{ params.n }}" gives "n=3", not "n=3.0").
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import celpy
import lark
from celpy import celtypes
from celpy.evaluation import base_functions, celstr
from google.protobuf import duration_pb2, timestamp_pb2

__all__ = [
    "Condition",
    "ExpressionError",
    "ExpressionProblem",
    "Template",
    "compile_condition",
    "compile_template",
    "scope",
]

# Bounds that keep parsing and evaluation cheap whatever a tenant submits. CEL has no loops, but
# nested comprehensions over a list of n items cost n**depth, and deep nesting costs stack.
MAX_SOURCE_LENGTH = 4096
MAX_COMPREHENSION_DEPTH = 3
MAX_SYNTAX_DEPTH = 400

_COMPREHENSIONS = frozenset({"map", "filter", "all", "exists", "exists_one"})
_INT64_LIMIT = 2**63
_EXACT_FLOAT_LIMIT = 2**53
# celpy's messages name grammar rules and Python classes; users know CEL operators and types.
_RULE_NAME = re.compile(r"Token\('RULE', '(\w+)'\)")
_CEL_CLASS = re.compile(r"<class 'celpy\.celtypes\.(\w+?)Type'>")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


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


# --- compiling ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Program:
    source: str
    runner: celpy.Runner
    references: frozenset[str]
    comprehensions: int = 0  # deepest nesting of map/filter/all/exists/exists_one


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool | celtypes.BoolType)


def _plain(value: float) -> float:
    # Python compares int with float exactly, so no precision is lost for large ints.
    return float(value) if isinstance(value, float) else int(value)


def _numeric_comparison(name: str, compare: Callable[[Any, Any], bool]) -> Callable[..., Any]:
    base = base_functions[name]

    def comparison(left: Any, right: Any) -> Any:
        if _is_number(left) and _is_number(right) and type(left) is not type(right):
            return celtypes.BoolType(compare(_plain(left), _plain(right)))
        return base(left, right)

    return comparison


def _promoting(name: str, apply: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    base = base_functions[name]

    def arithmetic(left: Any, right: Any) -> Any:
        if (
            _is_number(left)
            and _is_number(right)
            and isinstance(left, float) != isinstance(right, float)
        ):
            # celtypes.DoubleType keeps CEL's double semantics (x / 0.0 is infinity).
            return apply(celtypes.DoubleType(float(left)), celtypes.DoubleType(float(right)))
        return base(left, right)

    return arithmetic


def _membership(item: Any, container: Any) -> Any:
    if _is_number(item) and isinstance(container, list):
        wanted = _plain(item)
        return celtypes.BoolType(
            any(_is_number(element) and _plain(element) == wanted for element in container)
        )
    return base_functions["_in_"](item, container)


# Pure functions of their two operands: they cannot reach anything outside the expression.
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "_==_": _numeric_comparison("_==_", operator.eq),
    "_!=_": _numeric_comparison("_!=_", operator.ne),
    "_<_": _numeric_comparison("_<_", operator.lt),
    "_<=_": _numeric_comparison("_<=_", operator.le),
    "_>_": _numeric_comparison("_>_", operator.gt),
    "_>=_": _numeric_comparison("_>=_", operator.ge),
    "_+_": _promoting("_+_", operator.add),
    "_-_": _promoting("_-_", operator.sub),
    "_*_": _promoting("_*_", operator.mul),
    "_/_": _promoting("_/_", operator.truediv),
    "_in_": _membership,
}


# Made at import: celpy raises the interpreter's recursion limit (to 2500) whenever an
# environment is created, and that should happen once, predictably, not mid-request.
_ENVIRONMENT = celpy.Environment()


@functools.lru_cache(maxsize=4096)
def _compile_cached(source: str) -> _Program | str:
    # Failures are cached too (as their message): a bad plan resubmitted in a loop stays cheap.
    if not source.strip():
        return "empty expression"
    if len(source) > MAX_SOURCE_LENGTH:
        return f"expression longer than {MAX_SOURCE_LENGTH} characters"
    env = _ENVIRONMENT
    try:
        ast = env.compile(source)
    except Exception as exc:  # celpy/lark raise several unrelated types on bad input
        return _syntax_message(exc)
    try:
        references, comprehensions = _inspect(ast)
        runner = env.program(ast, functions=_FUNCTIONS)
    except ExpressionError as exc:
        return exc.message
    except Exception as exc:
        return f"invalid expression: {_eval_message(exc)}"
    return _Program(source, runner, references, comprehensions)


def _compile(source: str) -> _Program:
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


def _inspect(ast: lark.Tree[Any]) -> tuple[frozenset[str], int]:
    """Enforce the size bounds; the step ids read as `steps.<id>` / `steps["id"]`, and the
    deepest comprehension nesting (for the cost bound at evaluation)."""
    references: set[str] = set()
    deepest = 0
    stack: list[tuple[lark.Tree[Any], int, int]] = [(ast, 0, 0)]
    while stack:
        tree, depth, comprehensions = stack.pop()
        if depth > MAX_SYNTAX_DEPTH:
            raise ExpressionError("expression is nested too deeply")
        if tree.data == "member_dot_arg" and _token(tree.children[1]) in _COMPREHENSIONS:
            comprehensions += 1
            deepest = max(deepest, comprehensions)
            if comprehensions > MAX_COMPREHENSION_DEPTH:
                raise ExpressionError(
                    f"more than {MAX_COMPREHENSION_DEPTH} nested comprehensions"
                    " (map, filter, all, exists, exists_one)"
                )
        if tree.data in ("member_dot", "member_index") and _is_steps(tree.children[0]):
            step_id = _step_key(tree)
            if step_id is not None:
                references.add(step_id)
        for child in tree.children:
            if isinstance(child, lark.Tree):
                stack.append((child, depth + 1, comprehensions))
    return frozenset(references), deepest


def _token(node: object) -> str | None:
    return str(node.value) if isinstance(node, lark.Token) else None


def _only_child(tree: lark.Tree[Any]) -> lark.Tree[Any] | lark.Token | None:
    return tree.children[0] if len(tree.children) == 1 else None


def _is_steps(node: object) -> bool:
    # member -> primary -> ident -> IDENT "steps"
    chain = ("member", "primary", "ident")
    for name in chain:
        if not isinstance(node, lark.Tree) or node.data != name:
            return False
        node = _only_child(node)
    return _token(node) == "steps"


def _step_key(tree: lark.Tree[Any]) -> str | None:
    key = tree.children[1]
    if tree.data == "member_dot":
        return _token(key)
    # steps["id"]: follow the single-child chain down to a string literal.
    node: object = key
    while isinstance(node, lark.Tree) and node.data != "literal":
        node = _only_child(node)
    if isinstance(node, lark.Tree):
        literal = _only_child(node)
        if isinstance(literal, lark.Token) and literal.type in ("STRING_LIT", "MLSTRING_LIT"):
            try:
                return str(celstr(literal))
            except Exception:  # a malformed escape: the evaluation will report it
                return None
    return None


def _eval_message(exc: BaseException) -> str:
    message = str(exc.args[0]) if exc.args else type(exc).__name__
    # celpy appends the whole activation to "undeclared reference" messages.
    message = message.split(" (in activation", 1)[0]
    message = _RULE_NAME.sub(r"'\1'", message)
    message = _CEL_CLASS.sub(lambda match: match.group(1).lower(), message)
    if len(message) > 300:
        message = message[:297] + "..."
    return message


# Nested comprehensions cost about n**depth for lists of n items; beyond this many element
# visits an expression is refused before it runs (CEL itself has no loops, so this bounds it).
MAX_EVALUATION_COST = 1_000_000


def _sizes(values: Any, budget: int = 1_000_000) -> tuple[int, int]:
    """(longest list, longest string or list) anywhere in `values`; past `budget` nodes the
    walk gives up and reports both as `budget`."""
    longest_list = longest = 0
    stack = [values]
    seen = 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > budget:
            return budget, budget
        if isinstance(value, str | bytes):
            longest = max(longest, len(value))
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            longest_list = max(longest_list, len(value))
            longest = max(longest, len(value))
            stack.extend(value)
    return longest_list, longest


# What one expression may build by concatenation: (`+` count + 1) * the largest value it
# can read. Bigger results are refused before evaluation.
MAX_EVALUATION_SIZE = 4 * 1024 * 1024


def _check_cost(program: _Program, activation: Mapping[str, Any]) -> None:
    pluses = program.source.count("+")
    if pluses and not program.comprehensions:
        size = (pluses + 1) * max(_sizes(activation)[1], len(program.source))
        if size > MAX_EVALUATION_SIZE:
            raise ExpressionError(
                f"{program.source.strip()[:80]!r}: too costly to evaluate (concatenation could "
                f"build {size:,} items; the limit is {MAX_EVALUATION_SIZE:,})"
            )
        return
    if not program.comprehensions:
        return
    # A list literal in the source has at most (commas + 1) items; and inside comprehensions
    # every `+` can multiply what a level builds (strings and lists grow, not just loop), so
    # each level is charged items * (pluses + 1).
    items = max(_sizes(activation)[0], program.source.count(",") + 1)
    growth = program.source.count("+") + 1
    cost = (items * growth) ** program.comprehensions
    if cost > MAX_EVALUATION_COST:
        raise ExpressionError(
            f"{program.source.strip()[:80]!r}: too costly to evaluate ({program.comprehensions}"
            f" nested comprehensions over up to {items} items, {growth - 1} '+'; the limit is "
            f"{MAX_EVALUATION_COST:,} element visits)"
        )


def _evaluate(program: _Program, activation: Mapping[str, Any]) -> Any:
    _check_cost(program, activation)
    try:
        cel_scope = {name: _to_cel(value) for name, value in activation.items()}
        result = program.runner.evaluate(cel_scope)
    except ExpressionError:
        raise
    except Exception as exc:  # CELEvalError, and anything celpy lets escape on odd input
        raise ExpressionError(f"{program.source.strip()!r}: {_eval_message(exc)}") from None
    return result


# --- values in and out -------------------------------------------------------------------

_CEL_TYPES = (
    celtypes.BoolType,
    celtypes.IntType,
    celtypes.UintType,
    celtypes.DoubleType,
    celtypes.StringType,
    celtypes.BytesType,
    celtypes.ListType,
    celtypes.MapType,
    celtypes.TimestampType,
    celtypes.DurationType,
)


def _to_cel(value: Any) -> Any:
    """Plain JSON-like Python → celpy values; a double stays a double (see the module doc)."""
    if value is None or isinstance(value, _CEL_TYPES):
        return value
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        if -_INT64_LIMIT <= value < _INT64_LIMIT:
            return celtypes.IntType(value)
        try:
            return celtypes.DoubleType(float(value))
        except OverflowError:
            raise ExpressionError("an integer is too large for an expression") from None
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, Mapping):
        return celtypes.MapType(
            {celtypes.StringType(str(key)): _to_cel(item) for key, item in value.items()}
        )
    if isinstance(value, list | tuple):
        return celtypes.ListType([_to_cel(item) for item in value])
    raise ExpressionError(f"a value of type {type(value).__name__} cannot be used in expressions")


def _to_json(value: Any) -> Any:
    """celpy values → plain JSON Python values (dict, list, str, int, float, bool, None)."""
    if value is None:
        return None
    if isinstance(value, bool | celtypes.BoolType):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ExpressionError(f"result {float(value)} is not a finite number")
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
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
    if isinstance(key, bool | celtypes.BoolType):
        return "true" if key else "false"
    if isinstance(key, str | int):
        return str(key) if isinstance(key, str) else str(int(key))
    raise ExpressionError(f"a map key of type {type(key).__name__} has no JSON form")


def scope(
    params: Mapping[str, Any],
    vars: Mapping[str, Any],
    step_outputs: Mapping[str, Any],
) -> dict[str, Any]:
    """The activation for conditions and templates: `params`, `vars`, `steps.<id>.output`.

    Only steps listed in `step_outputs` exist, so reading the output of a step that did not
    complete is an evaluation error rather than a silent null.
    """
    return {
        "params": _to_cel(params),
        "vars": _to_cel(vars),
        "steps": celtypes.MapType(
            {
                celtypes.StringType(step_id): celtypes.MapType(
                    {celtypes.StringType("output"): _to_cel(output)}
                )
                for step_id, output in step_outputs.items()
            }
        ),
    }


# --- conditions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A compiled CEL condition; `evaluate` returns its bool value."""

    source: str
    _program: _Program

    def evaluate(self, scope: Mapping[str, Any]) -> bool:
        """The condition's value in `scope`; ExpressionError on an error or a non-bool."""
        result = _evaluate(self._program, scope)
        if not isinstance(result, celtypes.BoolType | bool):
            raise ExpressionError(
                f"{self.source.strip()!r}: a condition must be a bool, got {_cel_type_name(result)}"
            )
        return bool(result)

    def references(self) -> set[str]:
        """Step ids the condition reads as `steps.<id>` or `steps["<id>"]`."""
        return set(self._program.references)


def _cel_type_name(value: Any) -> str:
    if value is None:
        return "null"
    name = type(value).__name__
    return name.removesuffix("Type").lower() if name.endswith("Type") else name


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

    program: _Program


@dataclass(frozen=True)
class _Interpolated:
    """Literal text and expressions, rendered as text and joined."""

    parts: tuple[str | _Program, ...]


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

    def render(self, scope: Mapping[str, Any]) -> Any:
        """The value with every template resolved in `scope`, as plain JSON Python values."""
        return _render(self._root, scope, "")

    def references(self) -> set[str]:
        """Step ids referenced as `steps.<id>` or `steps["<id>"]` anywhere in the value."""
        found: set[str] = set()
        for refs in self.references_by_path().values():
            found |= refs
        return found

    def references_by_path(self) -> dict[str, set[str]]:
        """For each templated string that reads steps, its path in the value and those ids."""
        found: dict[str, set[str]] = {}
        for path, node in _walk(self._root, ""):
            programs: Sequence[_Program] = ()
            if isinstance(node, _Whole):
                programs = (node.program,)
            elif isinstance(node, _Interpolated):
                programs = [part for part in node.parts if isinstance(part, _Program)]
            refs = {ref for program in programs for ref in program.references}
            if refs:
                found.setdefault(path, set()).update(refs)
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
    parts: list[str | _Program] = []
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
    if not any(isinstance(part, _Program) for part in parts):
        return _Literal(text)
    if len(parts) == 1 and isinstance(parts[0], _Program):
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


def _render(node: _Node, scope: Mapping[str, Any], path: str) -> Any:
    if isinstance(node, _Literal):
        return node.value
    if isinstance(node, _Object):
        return {key: _render(child, scope, _join(path, key)) for key, child in node.items}
    if isinstance(node, _Array):
        return [_render(child, scope, f"{path}[{i}]") for i, child in enumerate(node.items)]
    try:
        if isinstance(node, _Whole):
            return _to_json(_evaluate(node.program, scope))
        return "".join(
            part if isinstance(part, str) else _as_text(_to_json(_evaluate(part, scope)))
            for part in node.parts
        )
    except ExpressionError as exc:
        raise ExpressionError(exc.message, path=path) from None


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
