"""Plan validation before any run exists: structure, dependencies, expressions, capabilities.

`validate_request` collects every problem of an `ExecuteRequest` and raises one
`ValidationFailed` with a field violation per problem, or returns a `ValidatedPlan`: the plan,
its hash, a deterministic execution order and its expressions compiled once for the engine.

Step ids: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`. Ids that are also CEL identifiers
(`[A-Za-z_][A-Za-z0-9_]*`) read as `steps.fetch.output`; the others (dashes, dots, a leading
digit) as `steps["fetch-1"].output`.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import rfc8785
from google.protobuf import duration_pb2, json_format, struct_pb2

from orchestrator.server.errors import FieldViolation, PermissionDenied, ValidationFailed
from orchestrator.server.expressions import (
    Condition,
    ExpressionError,
    Template,
    compile_condition,
    compile_template,
)
from orchestrator.server.tools.registry import ToolRegistry
from orchestrator.v1 import orchestrator_pb2 as pb

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "MAX_RETRY_ATTEMPTS",
    "STEP_ID_PATTERN",
    "StepInfo",
    "ValidatedPlan",
    "ValidationCache",
    "check_capabilities",
    "plan_hash",
    "struct_to_python",
    "validate_request",
]

DEFAULT_TIMEOUT_SECONDS = 600.0
MAX_RETRY_ATTEMPTS = 100
STEP_ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")

_PLAN = "executable_plan"
_ON_FAILURE = ("", "stop", "continue")
# google.protobuf.Duration's own range (about 10,000 years).
_MAX_DURATION_SECONDS = 315_576_000_000
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_DURATION_STRING = re.compile(r"(\d{1,12})(\.\d{1,9})?s")


# Column widths of the store: longer values are the caller's mistake, not ours.
MAX_ID = 128
MAX_REQUEST_STRING = 256


def plan_hash(plan: pb.ExecutablePlan) -> str:
    """`sha256:` + hex SHA-256 of the RFC 8785 canonical JSON of the plan's proto3 JSON form.

    Raises ValueError when the plan has no JSON form (an invalid Duration, a non-finite number
    in a Struct); `validate_request` reports those as violations instead.
    """
    try:
        canonical = rfc8785.dumps(json_format.MessageToDict(plan))
    except (json_format.Error, ValueError, TypeError) as exc:
        raise ValueError(f"the plan has no canonical JSON form: {exc}") from exc
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def struct_to_python(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python (dict, list, str, float, bool, None), never raising.

    Keys are sorted: map order in protobuf is unspecified, and violations should not shuffle.
    """
    return _Walk(_UNBOUNDED).fields(struct, 1)


def value_to_python(value: struct_pb2.Value) -> Any:
    """A protobuf Value as plain Python, never raising."""
    return _Walk(_UNBOUNDED).value(value, 1)


def checked_struct(struct: struct_pb2.Struct, limit: int) -> tuple[dict[str, Any], bool, bool]:
    """`struct_to_python` in the one walk that also finds whether the Struct nests deeper
    than `limit` (values past it are left out, as None) and whether every number in it is
    finite: (value, too deep, finite). A request's parameters can be megabytes: one walk
    instead of four (conversion, depth, finiteness, conversion again)."""
    walk = _Walk(limit)
    converted = walk.fields(struct, 1)
    return converted, walk.too_deep, walk.finite


_UNBOUNDED = 1 << 30  # protobuf's decoder already stops at 100 levels


class _Walk:
    """One conversion of protobuf Values to plain Python, noting what it meets."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.too_deep = False  # a value sat deeper than `limit` (left out, as None)
        self.finite = True  # every number was finite

    def fields(self, of: struct_pb2.Struct, depth: int) -> dict[str, Any]:
        items, value = of.fields, self.value
        return {key: value(items[key], depth) for key in sorted(items)}

    def value(self, item: struct_pb2.Value, depth: int) -> Any:
        if depth > self.limit:
            self.too_deep = True
            return None
        kind = item.WhichOneof("kind")
        if kind == "number_value":
            number = item.number_value
            if not math.isfinite(number):
                self.finite = False
            return number
        if kind == "string_value":
            return item.string_value
        if kind == "list_value":
            value = self.value
            return [value(entry, depth + 1) for entry in item.list_value.values]
        if kind == "struct_value":
            return self.fields(item.struct_value, depth + 1)
        if kind == "bool_value":
            return item.bool_value
        return None


@dataclass(frozen=True)
class StepInfo:
    """A step with where it sits and its expressions, compiled once."""

    step: pb.Step
    flow_id: str
    index: int  # in its flow's `steps`
    position: int  # across the whole plan, flows in order
    parameters: Template
    conditions: tuple[Condition, ...]
    # Steps that must complete first (`depends_on`, deduplicated) and, in a sequential flow,
    # the step listed just before it, which must finish (in any state) first.
    depends_on: tuple[str, ...]
    runs_after: str | None


@dataclass(frozen=True)
class ValidatedPlan:
    """A plan that passed validation, with everything the engine needs precomputed."""

    plan: pb.ExecutablePlan
    plan_hash: str
    steps: dict[str, StepInfo]  # in plan position order
    order: list[str]  # a deterministic topological order of the normal (non-rollback) steps
    rollback: set[str]
    timeout_seconds: float
    flows: dict[str, pb.Flow] = field(default_factory=dict)
    default_retry_policy: pb.RetryPolicy | None = None
    # (field path, parameter name): parameters the plan reads whenever the step runs
    parameter_reads: tuple[tuple[str, str], ...] = ()
    # The request's own `parameters` and `variables` as JSON, converted once (for the
    # finite check) for whoever needs them next.
    parameters: dict[str, Any] = field(default_factory=dict)
    variables: dict[str, Any] = field(default_factory=dict)

    def missing_parameters(self, given: Mapping[str, Any]) -> list[FieldViolation]:
        """A violation for each parameter the plan always reads and the request lacks."""
        return [
            FieldViolation(where, f"reads params.{name}, which the request's parameters lack")
            for where, name in self.parameter_reads
            if name not in given
        ]


@dataclass
class _Entry:
    step: pb.Step
    flow: pb.Flow
    flow_index: int
    index: int
    position: int

    @property
    def path(self) -> str:
        return f"{_PLAN}.flows[{self.flow_index}].steps[{self.index}]"


class _Problems:
    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.violations:
            count = len(self.violations)
            noun = "problem" if count == 1 else "problems"
            raise ValidationFailed(
                f"plan validation failed: {count} {noun}", violations=self.violations
            )


@dataclass(frozen=True)
class Limits:
    """How large a plan may be (configurable; README lists the defaults)."""

    max_steps: int = 1000
    max_struct_depth: int = 24


DEFAULT_LIMITS = Limits()


class ValidationCache:
    """Plans found valid, by their bytes and the request's timeout: runs of one plan (the
    common case) pay for the plan's checks, expressions and hash once. Small plans only, so
    the cache stays small (256 x 64 KiB at most)."""

    MAX_ENTRIES = 256
    MAX_PLAN_BYTES = 64 * 1024

    def __init__(self) -> None:
        self._entries: dict[tuple[bytes, float | None], tuple[_Result, str]] = {}
        # Execute checks large requests in a thread while the loop checks small ones.
        self._lock = threading.Lock()

    @staticmethod
    def _key(plan: pb.ExecutablePlan, timeout: float | None) -> tuple[bytes, float | None]:
        return plan.SerializeToString(deterministic=True), timeout

    def get(self, plan: pb.ExecutablePlan, timeout: float | None) -> tuple[_Result, str] | None:
        key = self._key(plan, timeout)
        with self._lock:
            return self._entries.get(key)

    def put(
        self, plan: pb.ExecutablePlan, timeout: float | None, value: tuple[_Result, str]
    ) -> None:
        key = self._key(plan, timeout)
        if len(key[0]) > self.MAX_PLAN_BYTES:
            return
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = value


def validate_request(
    request: pb.ExecuteRequest,
    registry: ToolRegistry,
    limits: Limits = DEFAULT_LIMITS,
    cache: ValidationCache | None = None,
) -> ValidatedPlan:
    """Validate an ExecuteRequest's plan; ValidationFailed lists every problem found. With
    `cache`, a plan already found valid (with the same timeout) skips the plan checks."""
    problems = _Problems()
    # The timeout first (part of the cache's key); its problem is reported in its place below.
    timeout_problems = _Problems()
    request_timeout: float | None = None
    if request.HasField("timeout"):
        request_timeout = _check_duration(
            timeout_problems, "timeout", request.timeout, positive=True
        )
    plan = request.executable_plan
    has_plan = request.HasField("executable_plan")
    hit = cache.get(plan, request_timeout) if cache is not None and has_plan else None
    if hit is None:  # a plan found valid before passed its size checks (the same limits)
        _check_size(problems, request, limits)
    for name in ("triggered_by", "correlation_id", "idempotency_key"):
        if len(getattr(request, name)) > MAX_REQUEST_STRING:
            problems.add(name, f"must be at most {MAX_REQUEST_STRING} characters")
        elif "\x00" in getattr(request, name):
            problems.add(name, "must not contain NUL characters")
    _check_queueing(problems, request)
    problems.violations.extend(timeout_problems.violations)
    given: dict[str, dict[str, Any]] = {}
    for name in ("parameters", "variables"):
        value, too_deep, all_finite = checked_struct(
            getattr(request, name), limits.max_struct_depth
        )
        if too_deep:
            problems.add(name, f"nested deeper than {limits.max_struct_depth} levels")
        elif not all_finite:
            _check_finite(problems, name, value)  # each number's path
        given[name] = value
    if not has_plan:
        problems.add(_PLAN, "an executable plan is required")
        problems.raise_if_any()
    hash_error = ""
    if hit is not None:
        validated: _Result | None
        validated, computed = hit
    else:
        validated = _PlanValidator(plan, registry, problems).run(request_timeout)
        computed = ""
        try:
            computed = plan_hash(plan)
        except ValueError as exc:
            hash_error = str(exc)
        if cache is not None and validated and computed and not problems.violations:
            cache.put(plan, request_timeout, (validated, computed))
    if request.plan_hash and computed and request.plan_hash != computed:
        problems.add("plan_hash", f"does not match the plan: expected {computed}")
    # An unhashable plan is nearly always explained by a violation found above already.
    if hash_error and not problems.violations:
        problems.add(_PLAN, hash_error)
    problems.raise_if_any()
    assert validated is not None  # run() returns None only when it found problems
    return ValidatedPlan(
        plan=plan,
        plan_hash=computed,
        steps=validated.steps,
        order=validated.order,
        rollback=validated.rollback,
        timeout_seconds=validated.timeout_seconds,
        flows=validated.flows,
        default_retry_policy=validated.default_retry_policy,
        parameter_reads=validated.parameter_reads,
        parameters=given["parameters"],
        variables=given["variables"],
    )


@dataclass
class _Result:
    steps: dict[str, StepInfo]
    order: list[str]
    rollback: set[str]
    timeout_seconds: float
    flows: dict[str, pb.Flow]
    default_retry_policy: pb.RetryPolicy | None
    parameter_reads: tuple[tuple[str, str], ...]


class _PlanValidator:
    def __init__(self, plan: pb.ExecutablePlan, registry: ToolRegistry, problems: _Problems):
        self.plan = plan
        self.registry = registry
        self.problems = problems
        self.entries: list[_Entry] = []
        self.first: dict[str, _Entry] = {}  # step id -> its first (valid) occurrence
        self.rollback: set[str] = set()
        self.flows: dict[str, pb.Flow] = {}
        # Explicit dependency edges between normal steps: id -> [(dependency id, depends_on index)]
        self.edges: dict[str, list[tuple[str, int]]] = {}
        self.runs_after: dict[str, str] = {}
        self.templates: dict[str, Template] = {}
        self.conditions: dict[str, tuple[Condition, ...]] = {}
        self.parameter_reads: list[tuple[str, str]] = []

    def run(self, request_timeout: float | None) -> _Result | None:
        self._check_flows()
        self._check_steps()
        self._check_rollback()
        self._check_dependencies()
        self._check_cycles()
        self._check_expressions()
        self._check_finite_structs()
        config_timeout, default_retry = self._check_configuration()
        if self.problems.violations:
            return None
        steps = {
            step_id: StepInfo(
                step=entry.step,
                flow_id=entry.flow.flow_id,
                index=entry.index,
                position=entry.position,
                parameters=self.templates[step_id],
                conditions=self.conditions[step_id],
                depends_on=tuple(dep for dep, _ in self.edges.get(step_id, ())),
                runs_after=self.runs_after.get(step_id),
            )
            for step_id, entry in self.first.items()
        }
        if request_timeout is not None:
            timeout = request_timeout
        elif config_timeout is not None:
            timeout = config_timeout
        else:
            timeout = DEFAULT_TIMEOUT_SECONDS
        return _Result(
            steps=steps,
            order=self._order(),
            rollback=set(self.rollback),
            timeout_seconds=timeout,
            flows=self.flows,
            default_retry_policy=default_retry,
            parameter_reads=tuple(self.parameter_reads),
        )

    # --- structure ------------------------------------------------------------------------

    def _check_flows(self) -> None:
        add = self.problems.add
        if not self.plan.flows:
            add(f"{_PLAN}.flows", "a plan needs at least one flow")
        seen: dict[str, int] = {}
        position = 0
        for i, flow in enumerate(self.plan.flows):
            path = f"{_PLAN}.flows[{i}]"
            if not flow.flow_id:
                add(f"{path}.flow_id", "must not be empty")
            elif len(flow.flow_id) > MAX_ID:
                add(f"{path}.flow_id", f"must be at most {MAX_ID} characters")
            elif "\x00" in flow.flow_id:
                add(f"{path}.flow_id", "must not contain NUL characters")
            elif flow.flow_id in seen:
                add(
                    f"{path}.flow_id",
                    f'duplicate flow_id "{flow.flow_id}" (also flows[{seen[flow.flow_id]}])',
                )
            else:
                seen[flow.flow_id] = i
                self.flows[flow.flow_id] = flow
            if not flow.steps:
                add(f"{path}.steps", "a flow needs at least one step")
            if flow.max_concurrency < 0:
                add(f"{path}.max_concurrency", "must not be negative (0 means no limit)")
            if flow.on_failure not in _ON_FAILURE:
                add(
                    f"{path}.on_failure",
                    f'must be "stop" or "continue", not "{flow.on_failure}"',
                )
            for j, step in enumerate(flow.steps):
                self.entries.append(_Entry(step, flow, i, j, position))
                position += 1

    def _check_steps(self) -> None:
        add = self.problems.add
        for entry in self.entries:
            step, path = entry.step, entry.path
            step_id = step.step_id
            if not step_id:
                add(f"{path}.step_id", "must not be empty")
            elif not STEP_ID_PATTERN.fullmatch(step_id):
                add(
                    f"{path}.step_id",
                    f'step_id "{_clip(step_id)}" must be 1-128 letters, digits, "_", "-" or'
                    ' "." and not start with "-" or "."',
                )
            elif step_id in self.first:
                add(
                    f"{path}.step_id",
                    f'duplicate step_id "{step_id}" (first at {self.first[step_id].path})',
                )
            else:
                self.first[step_id] = entry
            if not step.tool:
                add(f"{path}.tool", "must not be empty")
            elif step.tool not in self.registry:
                add(f"{path}.tool", f'unknown tool "{_clip(step.tool)}"')
            if step.HasField("timeout"):
                _check_duration(self.problems, f"{path}.timeout", step.timeout, positive=True)
            if step.HasField("retry_policy"):
                _check_retry_policy(self.problems, f"{path}.retry_policy", step.retry_policy)

    def _check_rollback(self) -> None:
        for i, flow in enumerate(self.plan.flows):
            own = {step.step_id for step in flow.steps if step.step_id}
            seen: set[str] = set()
            for k, step_id in enumerate(flow.rollback_steps):
                path = f"{_PLAN}.flows[{i}].rollback_steps[{k}]"
                if step_id in seen:
                    self.problems.add(path, f'duplicate rollback step "{_clip(step_id)}"')
                elif step_id not in own:
                    self.problems.add(
                        path,
                        f'step "{_clip(step_id)}" is not a step of flow "{_clip(flow.flow_id)}"',
                    )
                else:
                    self.rollback.add(step_id)
                seen.add(step_id)

    # --- dependencies ----------------------------------------------------------------------

    def _check_dependencies(self) -> None:
        add = self.problems.add
        previous: dict[int, str] = {}  # flow index -> last normal step seen (sequential flows)
        for entry in self.entries:
            step, path = entry.step, entry.path
            is_unique = self.first.get(step.step_id) is entry
            is_normal = is_unique and step.step_id not in self.rollback
            if is_normal:
                self.edges[step.step_id] = []
                if not entry.flow.parallel_execution:
                    if entry.flow_index in previous:
                        self.runs_after[step.step_id] = previous[entry.flow_index]
                    previous[entry.flow_index] = step.step_id
            seen: set[str] = set()
            for k, dep in enumerate(step.depends_on):
                field_path = f"{path}.depends_on[{k}]"
                if dep in seen:
                    add(field_path, f'duplicate dependency "{_clip(dep)}"')
                    continue
                seen.add(dep)
                if dep and dep == step.step_id:
                    add(field_path, "a step cannot depend on itself")
                    continue
                target = self.first.get(dep)
                if target is None:
                    add(field_path, f'unknown step "{_clip(dep)}"')
                    continue
                if not is_normal:
                    # Rollback steps are not scheduled; duplicates are already reported.
                    continue
                if dep in self.rollback:
                    add(
                        field_path,
                        f'step "{dep}" is a rollback step: it only runs when its flow fails',
                    )
                    continue
                if (
                    target.flow_index == entry.flow_index
                    and not entry.flow.parallel_execution
                    and target.index > entry.index
                ):
                    add(
                        field_path,
                        f'step "{dep}" comes later in sequential flow "{entry.flow.flow_id}",'
                        " which runs its steps in listed order: deadlock",
                    )
                    continue
                self.edges[step.step_id].append((dep, k))

    def _check_cycles(self) -> None:
        reported: set[str] = set()
        explicit = {node: [dep for dep, _ in deps] for node, deps in self.edges.items()}
        self._report_cycles(explicit, reported, "cycle")
        # Sequential flows add implicit edges; a cycle through them is a deadlock even when
        # `depends_on` alone is acyclic (flows A=[a1, a2], B=[b1, b2]; a1 needs b2, b1 needs a2).
        combined = {node: list(deps) for node, deps in explicit.items()}
        for node, before in self.runs_after.items():
            combined[node].append(before)
        self._report_cycles(combined, reported, "deadlock")

    def _report_cycles(self, graph: Mapping[str, list[str]], reported: set[str], kind: str) -> None:
        position = {node: self.first[node].position for node in graph}
        for component in _strongly_connected(graph):
            if len(component) < 2:
                continue
            members = sorted(component, key=position.__getitem__)
            find_path = _path_finder(graph, component, root=members[0])
            for node in members:
                if node in reported:
                    continue
                closing = next(((dep, k) for dep, k in self.edges[node] if dep in component), None)
                if closing is None:
                    continue  # on the cycle only through its place in a sequential flow
                dep, k = closing
                shown, length = find_path(dep, node)
                description = f"{kind}: {_describe_cycle([node, *shown], length + 1)}"
                if kind == "deadlock":
                    description += " (a sequential flow runs its steps in listed order)"
                self.problems.add(f"{self.first[node].path}.depends_on[{k}]", description)
                reported.add(node)

    def _order(self) -> list[str]:
        graph: dict[str, list[str]] = {
            node: [dep for dep, _ in deps] for node, deps in self.edges.items()
        }
        for node, before in self.runs_after.items():
            graph[node].append(before)
        dependents: dict[str, list[str]] = {node: [] for node in graph}
        waiting = {node: len(set(deps)) for node, deps in graph.items()}
        for node, deps in graph.items():
            for dep in set(deps):
                dependents[dep].append(node)
        ready = [(self.first[node].position, node) for node, count in waiting.items() if not count]
        heapq.heapify(ready)
        order: list[str] = []
        while ready:
            _, node = heapq.heappop(ready)
            order.append(node)
            for dependent in dependents[node]:
                waiting[dependent] -= 1
                if not waiting[dependent]:
                    heapq.heappush(ready, (self.first[dependent].position, dependent))
        return order

    # --- expressions and values ---------------------------------------------------------------

    def _check_expressions(self) -> None:
        known = set(self.first)
        for entry in self.entries:
            step, path = entry.step, entry.path
            params_path = f"{path}.parameters"
            template: Template | None = None
            try:
                template = compile_template(struct_to_python(step.parameters))
            except ExpressionError as exc:
                for problem in exc.problems:
                    self.problems.add(_join(params_path, problem.path), problem.message)
            if template is not None:
                for where, refs in template.references_by_path().items():
                    for ref in sorted(refs - known):
                        self.problems.add(
                            _join(params_path, where), f'references unknown step "{_clip(ref)}"'
                        )
            conditions: list[Condition] = []
            for k, source in enumerate(step.conditions):
                condition_path = f"{path}.conditions[{k}]"
                try:
                    condition = compile_condition(source)
                except ExpressionError as exc:
                    self.problems.add(condition_path, exc.message)
                    continue
                conditions.append(condition)
                for ref in sorted(condition.references() - known):
                    self.problems.add(condition_path, f'references unknown step "{_clip(ref)}"')
            if self.first.get(step.step_id) is entry and template is not None:
                self.templates[step.step_id] = template
                self.conditions[step.step_id] = tuple(conditions)
                self._note_parameter_reads(entry, template, conditions)

    def _note_parameter_reads(
        self, entry: _Entry, template: Template, conditions: list[Condition]
    ) -> None:
        """The parameters the step reads whenever it runs. A step with conditions may not
        run, so only its conditions count, and those only when none of them is guarded."""
        if any(condition.program.guarded for condition in conditions):
            return
        for k, condition in enumerate(conditions):
            for name in sorted(condition.program.required_params()):
                self.parameter_reads.append((f"{entry.path}.conditions[{k}]", name))
        if conditions:
            return
        for where, program in template.programs():
            for name in sorted(program.required_params()):
                field = _join(f"{entry.path}.parameters", where)
                self.parameter_reads.append((field, name))

    def _check_finite_structs(self) -> None:
        _check_finite(self.problems, f"{_PLAN}.variables", struct_to_python(self.plan.variables))
        configuration = struct_to_python(self.plan.configuration)
        for known in ("timeout", "retry_policy"):
            configuration.pop(known, None)  # checked field by field in _check_configuration
        _check_finite(self.problems, f"{_PLAN}.configuration", configuration)
        for entry in self.entries:
            for name in ("parameters", "metadata"):
                value = struct_to_python(getattr(entry.step, name))
                _check_finite(self.problems, f"{entry.path}.{name}", value)

    def _check_configuration(self) -> tuple[float | None, pb.RetryPolicy | None]:
        fields = self.plan.configuration.fields
        path = f"{_PLAN}.configuration"
        timeout: float | None = None
        if "timeout" in fields:
            timeout = _config_seconds(fields["timeout"])
            if timeout is None or timeout <= 0:
                timeout = None
                self.problems.add(
                    f"{path}.timeout",
                    'must be a positive number of seconds or a duration string like "30s"',
                )
        retry: pb.RetryPolicy | None = None
        if "retry_policy" in fields:
            value = fields["retry_policy"]
            retry_path = f"{path}.retry_policy"
            if value.WhichOneof("kind") != "struct_value":
                self.problems.add(retry_path, "must be a map of RetryPolicy fields")
            else:
                retry = pb.RetryPolicy()
                try:
                    json_format.ParseDict(struct_to_python(value.struct_value), retry)
                except (json_format.Error, ValueError, TypeError) as exc:
                    self.problems.add(retry_path, f"not a valid RetryPolicy: {exc}")
                    retry = None
                else:
                    if not _check_retry_policy(self.problems, retry_path, retry):
                        retry = None
        return timeout, retry


# --- helpers ---------------------------------------------------------------------------------


def _clip(text: str, limit: int = 100) -> str:
    # Violations echo user input; keep them readable when the input is huge.
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _join(base: str, path: str) -> str:
    if not path:
        return base
    return f"{base}{path}" if path.startswith("[") else f"{base}.{path}"


def _format_duration(duration: duration_pb2.Duration) -> str:
    return f"{duration.seconds + duration.nanos / 1e9:g}s"


def _check_duration(
    problems: _Problems, path: str, duration: duration_pb2.Duration, *, positive: bool
) -> float | None:
    """The duration in seconds, or None after reporting why it is not acceptable."""
    seconds, nanos = duration.seconds, duration.nanos
    if seconds < 0 or nanos < 0:
        problems.add(path, f"must not be negative (got {_format_duration(duration)})")
        return None
    if seconds > _MAX_DURATION_SECONDS or nanos >= 1_000_000_000:
        problems.add(path, "out of range for a google.protobuf.Duration")
        return None
    value = seconds + nanos / 1e9
    if positive and value == 0:
        problems.add(path, "must be positive")
        return None
    return value


def _check_retry_policy(problems: _Problems, path: str, policy: pb.RetryPolicy) -> bool:
    """Report every problem of a retry policy; True when it has none."""
    before = len(problems.violations)
    if not 0 <= policy.max_attempts <= MAX_RETRY_ATTEMPTS:
        problems.add(
            f"{path}.max_attempts",
            f"must be between 0 (the default) and {MAX_RETRY_ATTEMPTS}, not {policy.max_attempts}",
        )
    initial = max_delay = None
    if policy.HasField("initial_delay"):
        initial = _check_duration(
            problems, f"{path}.initial_delay", policy.initial_delay, positive=False
        )
    if policy.HasField("max_delay"):
        max_delay = _check_duration(problems, f"{path}.max_delay", policy.max_delay, positive=False)
    if initial is not None and max_delay is not None and initial > max_delay:
        problems.add(
            f"{path}.initial_delay",
            f"initial_delay ({_format_duration(policy.initial_delay)}) must not exceed"
            f" max_delay ({_format_duration(policy.max_delay)})",
        )
    base = policy.exponential_base
    if not math.isfinite(base) or (base != 0 and base < 1):
        problems.add(
            f"{path}.exponential_base", f"must be at least 1 (0 means the default, 2), not {base}"
        )
    return len(problems.violations) == before


def _config_seconds(value: struct_pb2.Value) -> float | None:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        seconds = value.number_value
    elif kind == "string_value":
        match = _DURATION_STRING.fullmatch(value.string_value)
        if match is None:
            return None
        seconds = float(match.group(0)[:-1])
    else:
        return None
    if not math.isfinite(seconds) or seconds > _MAX_DURATION_SECONDS:
        return None
    return seconds


MAX_CONCURRENCY_KEY = 128
MAX_CONCURRENT = 10_000


def _check_queueing(problems: _Problems, request: pb.ExecuteRequest) -> None:
    """concurrency_key, max_concurrent and priority."""
    key = request.concurrency_key
    if len(key) > MAX_CONCURRENCY_KEY:
        problems.add("concurrency_key", f"must be at most {MAX_CONCURRENCY_KEY} characters")
    elif "\x00" in key or key != key.strip():
        problems.add("concurrency_key", "must not contain NUL or start or end with a space")
    if request.max_concurrent and not key:
        problems.add("max_concurrent", "needs a concurrency_key")
    elif not 0 <= request.max_concurrent <= MAX_CONCURRENT:
        problems.add("max_concurrent", f"must be between 1 and {MAX_CONCURRENT:,}")
    if not 0 <= request.priority <= 5:
        problems.add("priority", "must be between 1 (first) and 5 (last)")


def _check_size(problems: _Problems, request: pb.ExecuteRequest, limits: Limits) -> None:
    """Too many steps or too deeply nested Structs: refused before anything walks them."""
    plan = request.executable_plan
    steps = sum(len(flow.steps) for flow in plan.flows)
    if steps > limits.max_steps:
        problems.add(f"{_PLAN}.flows", f"{steps} steps; a plan has at most {limits.max_steps}")
        problems.raise_if_any()
    # The request's own parameters and variables are bounded as they are converted.
    structs: list[tuple[str, struct_pb2.Struct]] = [
        (f"{_PLAN}.variables", plan.variables),
        (f"{_PLAN}.configuration", plan.configuration),
    ]
    for i, flow in enumerate(plan.flows):
        for j, step in enumerate(flow.steps):
            structs.append((f"{_PLAN}.flows[{i}].steps[{j}].parameters", step.parameters))
            structs.append((f"{_PLAN}.flows[{i}].steps[{j}].metadata", step.metadata))
    for path, struct in structs:
        if _struct_depth(struct, limits.max_struct_depth) > limits.max_struct_depth:
            problems.add(path, f"nested deeper than {limits.max_struct_depth} levels")
    problems.raise_if_any()


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a plain JSON value (a scalar is 0), walked iteratively and only as deep
    as `limit` + 1: values nested past protobuf's decoding limit cannot be stored or sent."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def finite(value: Any) -> bool:
    """Whether a plain JSON value holds no NaN or infinity (proto3 JSON cannot carry them)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def more_nodes_than(value: Any, limit: int) -> bool:
    """Whether a plain JSON value has more than `limit` nodes (counted only that far)."""
    stack = [value]
    seen = 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _struct_depth(struct: struct_pb2.Struct, limit: int) -> int:
    """Nesting depth of a Struct, walked iteratively and only as deep as `limit` + 1."""
    deepest = 0
    stack: list[tuple[struct_pb2.Value, int]] = [(value, 1) for value in struct.fields.values()]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        kind = value.WhichOneof("kind")
        if kind == "struct_value":
            stack.extend((v, depth + 1) for v in value.struct_value.fields.values())
        elif kind == "list_value":
            stack.extend((v, depth + 1) for v in value.list_value.values)
    return deepest


def _check_finite(problems: _Problems, path: str, value: Any) -> None:
    # Proto3 JSON (and so the plan hash and the stored run) cannot carry NaN or infinity.
    if finite(value):  # the common case, without building a path for every item
        return
    if isinstance(value, float) and not math.isfinite(value):
        problems.add(path, f"{value} is not a JSON number")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(problems, _join(path, _key_path(key)), item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(problems, f"{path}[{index}]", item)


def _key_path(key: str) -> str:
    # The same spelling as expression paths: plain keys dotted, others quoted in brackets.
    if _PLAIN_KEY.fullmatch(key):
        return key
    return f"[{json.dumps(key, ensure_ascii=False)}]"


def _strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative so that long dependency chains cannot hit the stack limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, Iterable[str]]] = []
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work.append((root, iter(graph.get(root, ()))))
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


# Components up to this size get a shortest cycle per step (one BFS each); larger ones a
# closed walk through one root of which only the start is spelled out, so that a huge cyclic
# plan costs linear time and short messages, not quadratic.
_SHORTEST_CYCLE_LIMIT = 64
_CYCLE_SHOWN = 12

# (the first nodes of a path start -> ... -> goal, the number of edges on the whole path)
_PathFinder = Callable[[str, str], tuple[list[str], int]]


def _path_finder(graph: Mapping[str, list[str]], component: set[str], root: str) -> _PathFinder:
    """Paths inside one strongly connected component."""
    if len(component) <= _SHORTEST_CYCLE_LIMIT:

        def shortest(start: str, goal: str) -> tuple[list[str], int]:
            path = _tree_path(_bfs(graph, start, component), goal)[::-1]
            return path, len(path) - 1

        return shortest
    reverse: dict[str, list[str]] = {node: [] for node in component}
    for node in component:
        for child in graph[node]:
            if child in component:
                reverse[child].append(node)
    from_root = _bfs(graph, root, component)
    to_root = _bfs(reverse, root, component)
    depth_from, depth_to = _depths(from_root), _depths(to_root)

    def through_root(start: str, goal: str) -> tuple[list[str], int]:
        length = depth_to[start] + depth_from[goal]
        if length < _CYCLE_SHOWN:
            return _tree_path(to_root, start) + _tree_path(from_root, goal)[::-1][1:], length
        return _tree_path(to_root, start, limit=_CYCLE_SHOWN - 3), length

    return through_root


def _bfs(graph: Mapping[str, list[str]], root: str, within: set[str]) -> dict[str, str | None]:
    """Breadth-first parents of every node reachable from root inside `within`, in BFS order."""
    parents: dict[str, str | None] = {root: None}
    queue = deque([root])
    while queue:
        node = queue.popleft()
        for child in graph[node]:
            if child in within and child not in parents:
                parents[child] = node
                queue.append(child)
    return parents


def _depths(parents: Mapping[str, str | None]) -> dict[str, int]:
    depths: dict[str, int] = {}
    for node, parent in parents.items():  # BFS order: a parent comes before its children
        depths[node] = 0 if parent is None else depths[parent] + 1
    return depths


def _tree_path(parents: Mapping[str, str | None], node: str, limit: int | None = None) -> list[str]:
    """node, its parent, ..., the root of a BFS tree (at most `limit` nodes)."""
    path: list[str] = []
    current: str | None = node
    while current is not None and (limit is None or len(path) < limit):
        path.append(current)
        current = parents.get(current)
    return path


def _describe_cycle(shown: list[str], length: int) -> str:
    """`shown` starts and ends at the same step when complete; else it is a prefix."""
    if len(shown) == length + 1:
        return " -> ".join(shown)
    return f"{' -> '.join(shown)} -> ... -> {shown[0]} ({length} steps)"


# --- capabilities ----------------------------------------------------------------------------


def check_capabilities(
    plan: pb.ExecutablePlan, registry: ToolRegistry, granted: frozenset[str] | None
) -> None:
    """Check tools and capabilities against the plan's security context and the tenant's grant.

    `granted` is None when the server has no policy for the tenant. Raises PermissionDenied
    (reason CAPABILITY_DENIED) listing every violation.
    """
    context = plan.security_context
    allowed = set(context.allowed_tools)
    declared = set(context.required_capabilities)
    violations: list[FieldViolation] = []
    needed_by: dict[str, list[str]] = {}  # missing capability -> tools needing it
    for i, flow in enumerate(plan.flows):
        for j, step in enumerate(flow.steps):
            if step.tool not in allowed:
                violations.append(
                    FieldViolation(
                        f"{_PLAN}.flows[{i}].steps[{j}].tool",
                        f'tool "{_clip(step.tool)}" is not in security_context.allowed_tools',
                    )
                )
            tool = registry.get(step.tool)
            if tool is None:
                continue
            for capability in sorted(tool.capabilities - declared):
                tools = needed_by.setdefault(capability, [])
                if tool.name not in tools:
                    tools.append(tool.name)
    for capability, tools in needed_by.items():
        violations.append(
            FieldViolation(
                f"{_PLAN}.security_context.required_capabilities",
                f'capability "{capability}" (needed by {", ".join(tools)}) is not in'
                " security_context.required_capabilities",
            )
        )
    if granted is not None:
        for k, capability in enumerate(context.required_capabilities):
            if capability not in granted:
                violations.append(
                    FieldViolation(
                        f"{_PLAN}.security_context.required_capabilities[{k}]",
                        f'capability "{_clip(capability)}" is not granted to the tenant',
                    )
                )
    if violations:
        count = len(violations)
        noun = "problem" if count == 1 else "problems"
        raise PermissionDenied(
            f"capability validation failed: {count} {noun}",
            reason="CAPABILITY_DENIED",
            violations=violations,
        )
