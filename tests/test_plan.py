"""Plan validation, plan hash, execution order and capability checks (no server needed)."""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator.server.errors import FieldViolation, PermissionDenied, ValidationFailed
from orchestrator.server.expressions import scope as expression_scope
from orchestrator.server.plan import (
    DEFAULT_TIMEOUT_SECONDS,
    ValidatedPlan,
    ValidationCache,
    check_capabilities,
    plan_hash,
    validate_request,
)
from orchestrator.server.tools.registry import ToolRegistry, default_registry
from orchestrator.v1 import orchestrator_pb2 as pb

REGISTRY = default_registry(load_entry_points=False)
P = "executable_plan"


def step(step_id: str, tool: str = "core.echo", **fields: Any) -> dict[str, Any]:
    return {"stepId": step_id, "tool": tool, **fields}


def flow(flow_id: str, *steps: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"flowId": flow_id, "steps": list(steps), **fields}


def make_plan(*flows: dict[str, Any], **fields: Any) -> pb.ExecutablePlan:
    return json_format.ParseDict(
        {"planId": "p", "flows": list(flows), **fields}, pb.ExecutablePlan()
    )


def request(plan: pb.ExecutablePlan | None, **fields: Any) -> pb.ExecuteRequest:
    req = json_format.ParseDict(fields, pb.ExecuteRequest())
    if plan is not None:
        req.executable_plan.CopyFrom(plan)
    return req


def validate(plan: pb.ExecutablePlan, **fields: Any) -> ValidatedPlan:
    return validate_request(request(plan, **fields), REGISTRY)


def problems(plan: pb.ExecutablePlan | None, **fields: Any) -> list[FieldViolation]:
    with pytest.raises(ValidationFailed) as caught:
        validate_request(request(plan, **fields), REGISTRY)
    assert caught.value.reason == "VALIDATION_FAILED"
    assert caught.value.violations, "a failure must say why"
    return caught.value.violations


def only(plan: pb.ExecutablePlan | None, **fields: Any) -> FieldViolation:
    found = problems(plan, **fields)
    assert len(found) == 1, found
    return found[0]


def fields_of(plan: pb.ExecutablePlan | None, **fields: Any) -> list[str]:
    return [v.field for v in problems(plan, **fields)]


# --- a valid plan -----------------------------------------------------------------------------


def test_valid_plan_yields_steps_order_hash_and_defaults() -> None:
    plan = make_plan(
        flow(
            "main",
            step("fetch", parameters={"n": 1}),
            step("use", parameters={"v": "{{ steps.fetch.output.n }}"}, dependsOn=["fetch"]),
            step("undo"),
            parallelExecution=True,
            rollbackSteps=["undo"],
        ),
        flow("side", step("other", conditions=["steps.fetch.output.n == 1"])),
    )
    validated = validate(plan)
    assert validated.plan_hash == plan_hash(plan)
    assert list(validated.steps) == ["fetch", "use", "undo", "other"]
    info = validated.steps["other"]
    assert (info.flow_id, info.index, info.position) == ("side", 0, 3)
    assert validated.order == ["fetch", "use", "other"], "rollback steps are not scheduled"
    assert validated.rollback == {"undo"}
    assert validated.timeout_seconds == DEFAULT_TIMEOUT_SECONDS
    assert validated.steps["use"].depends_on == ("fetch",)
    scope = expression_scope({}, {}, {"fetch": {"n": 1.0}})
    assert validated.steps["use"].parameters.render(scope) == {"v": 1.0}
    assert validated.steps["other"].conditions[0].evaluate(scope) is True


def test_the_validation_cache_changes_no_answer() -> None:
    """A cached plan gives what a fresh validation gives; request-level problems are still
    found; an invalid plan is never cached; the timeout is part of the key."""
    cache = ValidationCache()
    plan = make_plan(flow("f", step("a"), step("b", dependsOn=["a"])))
    fresh = validate(plan)
    first = validate_request(request(plan), REGISTRY, cache=cache)
    again = validate_request(request(plan), REGISTRY, cache=cache)
    for got in (first, again):
        assert (got.plan_hash, got.order, got.timeout_seconds) == (
            fresh.plan_hash,
            fresh.order,
            fresh.timeout_seconds,
        )
    assert len(cache._entries) == 1
    assert validate_request(request(plan, timeout="7s"), REGISTRY, cache=cache).timeout_seconds == 7
    with pytest.raises(ValidationFailed) as caught:
        validate_request(request(plan, triggeredBy="x" * 300), REGISTRY, cache=cache)
    assert [v.field for v in caught.value.violations] == ["triggered_by"]
    with pytest.raises(ValidationFailed) as wrong_hash:
        validate_request(request(plan, planHash="0" * 64), REGISTRY, cache=cache)
    assert [v.field for v in wrong_hash.value.violations] == ["plan_hash"]
    broken = make_plan(flow("f", step("a", dependsOn=["missing"])))
    for _ in range(2):
        with pytest.raises(ValidationFailed):
            validate_request(request(broken), REGISTRY, cache=cache)
    assert len(cache._entries) == 2


def test_step_ids_up_to_128_sane_characters_are_accepted() -> None:
    long_id = "a" * 128
    validated = validate(make_plan(flow("f", step(long_id), step("x-1.y_2"), step("9lives"))))
    assert set(validated.steps) == {long_id, "x-1.y_2", "9lives"}


# --- one test per violation kind --------------------------------------------------------------


def test_missing_plan() -> None:
    assert only(None).field == P


def test_plan_without_flows() -> None:
    assert only(make_plan()).field == f"{P}.flows"


def test_flow_without_steps() -> None:
    found = only(make_plan(flow("a", step("s")), flow("b")))
    assert found.field == f"{P}.flows[1].steps"


def test_empty_and_duplicate_flow_ids() -> None:
    plan = make_plan(flow("", step("a")), flow("x", step("b")), flow("x", step("c")))
    assert fields_of(plan) == [f"{P}.flows[0].flow_id", f"{P}.flows[2].flow_id"]


def test_empty_step_id() -> None:
    assert only(make_plan(flow("f", step("")))).field == f"{P}.flows[0].steps[0].step_id"


def test_duplicate_step_id_across_flows() -> None:
    found = only(make_plan(flow("f", step("a")), flow("g", step("b"), step("a"))))
    assert found.field == f"{P}.flows[1].steps[1].step_id"
    assert "flows[0].steps[0]" in found.description


@pytest.mark.parametrize("bad", ["has space", "a/b", "é", "-lead", ".lead", "a" * 129, "{{x}}"])
def test_step_id_charset_and_length(bad: str) -> None:
    assert only(make_plan(flow("f", step(bad)))).field == f"{P}.flows[0].steps[0].step_id"


def test_empty_tool() -> None:
    assert only(make_plan(flow("f", step("a", tool="")))).field == f"{P}.flows[0].steps[0].tool"


def test_unknown_tool() -> None:
    found = only(make_plan(flow("f", step("a"), step("b", tool="x"))))
    assert found == FieldViolation(f"{P}.flows[0].steps[1].tool", 'unknown tool "x"')


def test_depends_on_unknown_step() -> None:
    found = only(make_plan(flow("f", step("a", dependsOn=["ghost"]))))
    assert found == FieldViolation(f"{P}.flows[0].steps[0].depends_on[0]", 'unknown step "ghost"')


def test_depends_on_itself() -> None:
    found = only(make_plan(flow("f", step("a"), step("b", dependsOn=["a", "b"]))))
    assert found.field == f"{P}.flows[0].steps[1].depends_on[1]"
    assert "itself" in found.description


def test_depends_on_duplicate() -> None:
    found = only(make_plan(flow("f", step("a"), step("b", dependsOn=["a", "a"]))))
    assert found.field == f"{P}.flows[0].steps[1].depends_on[1]"
    assert "duplicate" in found.description


def test_two_step_cycle_reports_each_step_once_with_its_path() -> None:
    plan = make_plan(
        flow("f", step("a", dependsOn=["b"]), step("b", dependsOn=["a"]), parallelExecution=True)
    )
    assert problems(plan) == [
        FieldViolation(f"{P}.flows[0].steps[0].depends_on[0]", "cycle: a -> b -> a"),
        FieldViolation(f"{P}.flows[0].steps[1].depends_on[0]", "cycle: b -> a -> b"),
    ]


def test_cycle_across_flows_is_reported_on_the_closing_entries() -> None:
    plan = make_plan(
        flow("f", step("a", dependsOn=["c"]), step("x"), parallelExecution=True),
        flow(
            "g", step("b", dependsOn=["x", "a"]), step("c", dependsOn=["b"]), parallelExecution=True
        ),
    )
    assert problems(plan) == [
        FieldViolation(f"{P}.flows[0].steps[0].depends_on[0]", "cycle: a -> c -> b -> a"),
        FieldViolation(f"{P}.flows[1].steps[0].depends_on[1]", "cycle: b -> a -> c -> b"),
        FieldViolation(f"{P}.flows[1].steps[1].depends_on[0]", "cycle: c -> b -> a -> c"),
    ]


def test_a_long_cycle_reports_every_step_with_a_shortened_path() -> None:
    size = 300
    ring = [step(f"s{i}", dependsOn=[f"s{(i - 1) % size}"]) for i in range(size)]
    found = problems(make_plan(flow("f", *ring, parallelExecution=True)))
    assert [v.field for v in found] == [
        f"{P}.flows[0].steps[{i}].depends_on[0]" for i in range(size)
    ]
    assert (
        found[5].description == "cycle: s5 -> s4 -> s3 -> s2 -> s1 -> s0 -> ... -> s5 (300 steps)"
    )
    assert found[200].description == (
        "cycle: s200 -> s199 -> s198 -> s197 -> s196 -> s195 -> s194 -> s193 -> s192 -> s191"
        " -> ... -> s200 (300 steps)"
    )
    assert all(len(v.description) < 200 for v in found)


def test_steps_off_the_cycle_are_not_reported() -> None:
    plan = make_plan(
        flow(
            "f",
            step("a", dependsOn=["b"]),
            step("b", dependsOn=["a"]),
            step("after", dependsOn=["a"]),
            parallelExecution=True,
        )
    )
    assert [v.field for v in problems(plan)] == [
        f"{P}.flows[0].steps[0].depends_on[0]",
        f"{P}.flows[0].steps[1].depends_on[0]",
    ]


def test_sequential_flow_depending_on_a_later_step_is_a_deadlock() -> None:
    found = only(make_plan(flow("f", step("a", dependsOn=["b"]), step("b"))))
    assert found.field == f"{P}.flows[0].steps[0].depends_on[0]"
    assert "deadlock" in found.description
    # The same dependency in a parallel flow is fine, and so is an earlier step in order.
    assert validate(
        make_plan(flow("f", step("a", dependsOn=["b"]), step("b"), parallelExecution=True))
    )
    assert validate(make_plan(flow("f", step("a"), step("b", dependsOn=["a"]))))


def test_deadlock_through_two_sequential_flows() -> None:
    plan = make_plan(
        flow("A", step("a1", dependsOn=["b2"]), step("a2")),
        flow("B", step("b1", dependsOn=["a2"]), step("b2")),
    )
    found = problems(plan)
    assert [v.field for v in found] == [
        f"{P}.flows[0].steps[0].depends_on[0]",
        f"{P}.flows[1].steps[0].depends_on[0]",
    ]
    assert found[0].description.startswith("deadlock: a1 -> b2 -> b1 -> a2 -> a1")


@pytest.mark.parametrize(
    ("timeout", "problem"),
    [("-1s", "negative"), ("0s", "positive"), ("-0.5s", "negative")],
)
def test_bad_step_timeout(timeout: str, problem: str) -> None:
    found = only(make_plan(flow("f", step("a", timeout=timeout))))
    assert found.field == f"{P}.flows[0].steps[0].timeout"
    assert problem in found.description


def test_out_of_range_step_timeout() -> None:
    plan = make_plan(flow("f", step("a")))
    plan.flows[0].steps[0].timeout.seconds = 10**15
    assert only(plan).field == f"{P}.flows[0].steps[0].timeout"


def test_negative_request_timeout() -> None:
    assert only(make_plan(flow("f", step("a"))), timeout="-3s").field == "timeout"


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"initialDelay": "-1s"}, "initial_delay"),
        ({"maxDelay": "-1s"}, "max_delay"),
        ({"initialDelay": "2s", "maxDelay": "1s"}, "initial_delay"),
        ({"maxAttempts": -1}, "max_attempts"),
        ({"maxAttempts": 101}, "max_attempts"),
        ({"exponentialBase": 0.5}, "exponential_base"),
        ({"exponentialBase": -2}, "exponential_base"),
        ({"exponentialBase": "NaN"}, "exponential_base"),
    ],
)
def test_bad_step_retry_policy(policy: dict[str, Any], field: str) -> None:
    found = only(make_plan(flow("f", step("a", retryPolicy=policy))))
    assert found.field == f"{P}.flows[0].steps[0].retry_policy.{field}"


def test_good_retry_policy_edges_are_accepted() -> None:
    policy = {"maxAttempts": 100, "initialDelay": "1s", "maxDelay": "1s", "exponentialBase": 1}
    assert validate(make_plan(flow("f", step("a", retryPolicy=policy), step("b", retryPolicy={}))))


def test_negative_max_concurrency() -> None:
    found = only(make_plan(flow("f", step("a"), maxConcurrency=-1)))
    assert found.field == f"{P}.flows[0].max_concurrency"


def test_unknown_on_failure() -> None:
    found = only(make_plan(flow("f", step("a"), onFailure="retry")))
    assert found.field == f"{P}.flows[0].on_failure"
    for ok in ("stop", "continue", ""):
        assert validate(make_plan(flow("f", step("a"), onFailure=ok)))


@pytest.mark.parametrize(
    "timeout", [-1, 0, math.nan, math.inf, "abc", "-1s", "30", "1m", True, None, [1], "NaN"]
)
def test_bad_configuration_timeout(timeout: Any) -> None:
    plan = make_plan(flow("f", step("a")), configuration={"timeout": timeout})
    assert only(plan).field == f"{P}.configuration.timeout"


@pytest.mark.parametrize(("timeout", "seconds"), [("30s", 30.0), ("1.5s", 1.5), (42, 42.0)])
def test_configuration_timeout_sets_the_run_timeout(timeout: Any, seconds: float) -> None:
    plan = make_plan(flow("f", step("a")), configuration={"timeout": timeout})
    assert validate(plan).timeout_seconds == seconds
    assert validate(plan, timeout="7s").timeout_seconds == 7.0, "the request's timeout wins"


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ("3 times", "retry_policy"),
        ({"maxAttempts": "three"}, "retry_policy"),
        ({"maxAttempts": 2.5}, "retry_policy"),
        ({"initialDelay": 5}, "retry_policy"),
        ({"unknownField": 1}, "retry_policy"),
        ({"max_attempts": 101}, "retry_policy.max_attempts"),
        ({"initialDelay": "5s", "max_delay": "1s"}, "retry_policy.initial_delay"),
    ],
)
def test_bad_configuration_retry_policy(policy: Any, field: str) -> None:
    plan = make_plan(flow("f", step("a")), configuration={"retry_policy": policy})
    assert only(plan).field == f"{P}.configuration.{field}"


def test_configuration_retry_policy_is_parsed_for_the_engine() -> None:
    policy = {"maxAttempts": 3, "initial_delay": "0.5s", "jitter": True}
    validated = validate(make_plan(flow("f", step("a")), configuration={"retry_policy": policy}))
    assert validated.default_retry_policy is not None
    assert validated.default_retry_policy.max_attempts == 3
    assert validated.default_retry_policy.initial_delay.nanos == 500_000_000
    assert validated.default_retry_policy.jitter is True


def test_template_that_does_not_parse_names_the_parameter() -> None:
    plan = make_plan(flow("f", step("a"), step("b", parameters={"url": "http://{{ 1 + }}"})))
    assert only(plan).field == f"{P}.flows[0].steps[1].parameters.url"


def test_every_broken_template_is_reported_with_its_nested_path() -> None:
    parameters = {"headers": {"x": "{{ params.a"}, "list": ["ok", "{{ ) }}"]}
    plan = make_plan(flow("f", step("a", parameters=parameters)))
    assert fields_of(plan) == [
        f"{P}.flows[0].steps[0].parameters.headers.x",
        f"{P}.flows[0].steps[0].parameters.list[1]",
    ]


def test_condition_that_does_not_compile() -> None:
    plan = make_plan(flow("f", step("a", conditions=["true", "steps.a.output ==="])))
    assert only(plan).field == f"{P}.flows[0].steps[0].conditions[1]"


def test_references_to_unknown_steps_in_templates_and_conditions() -> None:
    plan = make_plan(
        flow(
            "f",
            step("a"),
            step(
                "b",
                parameters={"known": "{{ steps.a.output }}", "x": "{{ steps.ghost.output }}"},
                conditions=["steps['phantom-1'].output == 1"],
            ),
        )
    )
    assert problems(plan) == [
        FieldViolation(f"{P}.flows[0].steps[1].parameters.x", 'references unknown step "ghost"'),
        FieldViolation(
            f"{P}.flows[0].steps[1].conditions[0]", 'references unknown step "phantom-1"'
        ),
    ]


def test_rollback_step_not_in_its_flow() -> None:
    plan = make_plan(flow("f", step("a")), flow("g", step("b"), rollbackSteps=["a"]))
    assert only(plan).field == f"{P}.flows[1].rollback_steps[0]"


def test_duplicate_rollback_step() -> None:
    plan = make_plan(flow("f", step("a"), step("undo"), rollbackSteps=["undo", "undo"]))
    assert only(plan).field == f"{P}.flows[0].rollback_steps[1]"


def test_normal_step_may_not_depend_on_a_rollback_step() -> None:
    plan = make_plan(
        flow("f", step("undo"), rollbackSteps=["undo"]),
        flow("g", step("b", dependsOn=["undo"])),
    )
    found = only(plan)
    assert found.field == f"{P}.flows[1].steps[0].depends_on[0]"
    assert "rollback" in found.description


def test_plan_hash_mismatch_names_the_expected_hash() -> None:
    plan = make_plan(flow("f", step("a")))
    found = only(plan, planHash="sha256:" + "0" * 64)
    assert found.field == "plan_hash"
    assert plan_hash(plan) in found.description
    assert validate(plan, planHash=plan_hash(plan)).plan_hash == plan_hash(plan)


def test_non_finite_numbers_are_rejected() -> None:
    plan = make_plan(flow("f", step("a")))
    plan.flows[0].steps[0].parameters["x"] = math.nan
    plan.variables["big"] = math.inf
    assert fields_of(plan) == [f"{P}.variables.big", f"{P}.flows[0].steps[0].parameters.x"]


def test_several_problems_give_several_violations() -> None:
    plan = make_plan(
        flow(
            "f",
            step("a", tool="nope", dependsOn=["ghost"], timeout="-1s"),
            step("a", parameters={"u": "{{"}),
            maxConcurrency=-5,
        )
    )
    with pytest.raises(ValidationFailed) as caught:
        validate_request(request(plan, timeout="-1s"), REGISTRY)
    fields = sorted(v.field for v in caught.value.violations)
    assert fields == sorted(
        [
            "timeout",
            f"{P}.flows[0].max_concurrency",
            f"{P}.flows[0].steps[0].tool",
            f"{P}.flows[0].steps[0].timeout",
            f"{P}.flows[0].steps[0].depends_on[0]",
            f"{P}.flows[0].steps[1].step_id",
            f"{P}.flows[0].steps[1].parameters.u",
        ]
    )
    assert caught.value.message == "plan validation failed: 7 problems"


# --- plan hash --------------------------------------------------------------------------------


def test_plan_hash_is_sha256_of_the_canonical_proto3_json() -> None:
    plan = pb.ExecutablePlan(plan_id="p", main_flow="m")
    plan.variables.update({"b": 1, "a": "x"})
    canonical = b'{"mainFlow":"m","planId":"p","variables":{"a":"x","b":1}}'
    assert plan_hash(plan) == "sha256:" + hashlib.sha256(canonical).hexdigest()


def test_plan_hash_is_stable_and_sensitive() -> None:
    plan = make_plan(flow("f", step("a", parameters={"x": 1, "y": [1, "two"]})))
    digest = plan_hash(plan)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert (
        plan_hash(make_plan(flow("f", step("a", parameters={"y": [1, "two"], "x": 1})))) == digest
    )
    changed = make_plan(flow("f", step("a", parameters={"x": 2, "y": [1, "two"]})))
    assert plan_hash(changed) != digest
    reordered = make_plan(flow("f", step("a", parameters={"x": 1, "y": ["two", 1]})))
    assert plan_hash(reordered) != digest, "list order is meaningful"


# --- order ------------------------------------------------------------------------------------


def test_order_of_a_diamond_follows_dependencies_then_plan_position() -> None:
    plan = make_plan(
        flow(
            "f",
            step("merge", dependsOn=["right", "left"]),
            step("right", dependsOn=["fetch"]),
            step("left", dependsOn=["fetch"]),
            step("fetch"),
            parallelExecution=True,
        )
    )
    assert validate(plan).order == ["fetch", "right", "left", "merge"]


def test_order_honors_sequential_flows_and_cross_flow_dependencies() -> None:
    plan = make_plan(
        flow("seq", step("s1"), step("s2", dependsOn=["p2"]), step("s3")),
        flow("par", step("p1"), step("p2", dependsOn=["s1"]), parallelExecution=True),
    )
    validated = validate(plan)
    assert validated.order == ["s1", "p1", "p2", "s2", "s3"]
    assert validated.steps["s3"].runs_after == "s2"
    assert validated.steps["p1"].runs_after is None


# --- capabilities -----------------------------------------------------------------------------


def capability_plan() -> pb.ExecutablePlan:
    return make_plan(
        flow(
            "f",
            step("a"),
            step("b", tool="http.request"),
            step("c", tool="core.wait"),
            step("d", tool="http.request"),
        ),
        securityContext={
            "allowedTools": ["core.echo", "http.request"],
            "requiredCapabilities": ["files.read", "admin"],
        },
    )


def test_capability_check_lists_every_violation() -> None:
    with pytest.raises(PermissionDenied) as caught:
        check_capabilities(capability_plan(), REGISTRY, frozenset({"admin"}))
    error = caught.value
    assert error.reason == "CAPABILITY_DENIED"
    assert error.message.startswith("capability validation failed")
    assert [v.field for v in error.violations] == [
        f"{P}.flows[0].steps[2].tool",
        f"{P}.security_context.required_capabilities",
        f"{P}.security_context.required_capabilities[0]",
    ]
    assert "network.http" in error.violations[1].description
    assert "files.read" in error.violations[2].description


def test_capability_check_without_tenant_policy_skips_the_grant() -> None:
    with pytest.raises(PermissionDenied) as caught:
        check_capabilities(capability_plan(), REGISTRY, None)
    assert len(caught.value.violations) == 2


def test_capability_check_passes_when_everything_is_declared_and_granted() -> None:
    plan = capability_plan()
    plan.security_context.allowed_tools.append("core.wait")
    plan.security_context.required_capabilities.append("network.http")
    check_capabilities(plan, REGISTRY, frozenset({"admin", "files.read", "network.http"}))
    check_capabilities(plan, REGISTRY, None)


# --- properties -------------------------------------------------------------------------------


@st.composite
def random_dags(draw: st.DrawFn) -> tuple[pb.ExecutablePlan, dict[str, list[str]]]:
    """Steps s0..sn-1 depend only on lower-numbered steps; listing order is shuffled."""
    count = draw(st.integers(1, 14))
    deps = {
        f"s{i}": draw(st.lists(st.sampled_from([f"s{j}" for j in range(i)]), unique=True))
        if i
        else []
        for i in range(count)
    }
    flow_count = draw(st.integers(1, 3))
    owner = {f"s{i}": draw(st.integers(0, flow_count - 1)) for i in range(count)}
    listed = draw(st.permutations(list(deps)))
    flows = []
    for f in range(flow_count):
        sequential = draw(st.booleans())
        members = [s for s in listed if owner[s] == f]
        if sequential:
            # Listed in dependency order, as a sequential flow must be to avoid deadlock.
            members.sort(key=lambda s: int(s[1:]))
        if members:
            flows.append(
                flow(
                    f"f{f}",
                    *(step(s, dependsOn=deps[s]) for s in members),
                    parallelExecution=not sequential,
                )
            )
    return make_plan(*flows), deps


@settings(max_examples=200, deadline=None)
@given(random_dags())
def test_random_dags_validate_and_order_respects_every_dependency(
    case: tuple[pb.ExecutablePlan, dict[str, list[str]]],
) -> None:
    plan, deps = case
    validated = validate(plan)
    assert sorted(validated.order) == sorted(deps)
    where = {step_id: i for i, step_id in enumerate(validated.order)}
    for step_id, needs in deps.items():
        for dep in needs:
            assert where[dep] < where[step_id]
    for flow_msg in plan.flows:
        if not flow_msg.parallel_execution:
            ids = [s.step_id for s in flow_msg.steps]
            assert [where[s] for s in ids] == sorted(where[s] for s in ids)
    assert validate(plan).order == validated.order, "the order is deterministic"


_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
_IDS = st.sampled_from(["", "a", "b", "c", "a-b", "x y", "é", "{{", "a" * 129, "steps"]) | _TEXT
_TOOLS = st.sampled_from([*REGISTRY.names(), "", "nope"]) | _TEXT
_EXPRESSIONS = st.sampled_from(
    [
        "{{",
        "}}",
        "{{ steps.a.output }}",
        "{{ steps.zz.output }}",
        "x {{ 1 + }} y",
        "{{ '}}' }}",
        "{{ steps['a-b'].output.x",
        "steps.b.output == 1",
        "true",
        "((",
        "{{ __import__('os') }}",
    ]
) | _TEXT.map(lambda t: "{{" + t + "}}")
_JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | _TEXT | _EXPRESSIONS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_SECONDS = st.integers(-(10**12), 10**12) | st.sampled_from([0, 1, 315_576_000_001])
_NANOS = st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 999_999_999])


@st.composite
def durations(draw: st.DrawFn) -> dict[str, int]:
    return {"seconds": draw(_SECONDS), "nanos": draw(_NANOS)}


@st.composite
def garbage_steps(draw: st.DrawFn) -> pb.Step:
    message = pb.Step(
        step_id=draw(_IDS),
        tool=draw(_TOOLS),
        depends_on=draw(st.lists(_IDS, max_size=3)),
        conditions=draw(st.lists(_EXPRESSIONS, max_size=2)),
    )
    message.parameters.update(draw(st.dictionaries(_TEXT, _JSON, max_size=3)))
    if draw(st.booleans()):
        message.timeout.seconds, message.timeout.nanos = draw(durations()).values()
    if draw(st.booleans()):
        policy = message.retry_policy
        policy.max_attempts = draw(st.integers(-(2**31), 2**31 - 1))
        policy.exponential_base = draw(st.floats())
        for name in ("initial_delay", "max_delay"):
            if draw(st.booleans()):
                value = getattr(policy, name)
                value.seconds, value.nanos = draw(durations()).values()
    return message


@st.composite
def garbage_requests(draw: st.DrawFn) -> pb.ExecuteRequest:
    req = pb.ExecuteRequest(plan_hash=draw(st.sampled_from(["", "sha256:x"]) | _TEXT))
    if draw(st.integers(0, 9)) == 0:
        return req
    plan = req.executable_plan
    for _ in range(draw(st.integers(0, 3))):
        flow_msg = plan.flows.add(
            flow_id=draw(_IDS),
            parallel_execution=draw(st.booleans()),
            max_concurrency=draw(st.integers(-(2**31), 2**31 - 1)),
            on_failure=draw(st.sampled_from(["", "stop", "continue", "retry"])),
            rollback_steps=draw(st.lists(_IDS, max_size=2)),
        )
        flow_msg.steps.extend(draw(st.lists(garbage_steps(), max_size=4)))
    plan.configuration.update(
        draw(st.dictionaries(st.sampled_from(["timeout", "retry_policy", "other"]), _JSON))
    )
    plan.variables.update(draw(st.dictionaries(_TEXT, _JSON, max_size=2)))
    if draw(st.booleans()):
        req.timeout.seconds, req.timeout.nanos = draw(durations()).values()
    return req


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(garbage_requests())
def test_garbage_plans_only_ever_fail_validation(req: pb.ExecuteRequest) -> None:
    before = req.SerializeToString(deterministic=True)
    try:
        validated = validate_request(req, REGISTRY)
    except ValidationFailed as exc:
        event("rejected")
        assert exc.violations
        assert all(v.field and v.description for v in exc.violations)
    else:
        event("accepted")
        assert set(validated.order) == set(validated.steps) - validated.rollback
        try:
            check_capabilities(req.executable_plan, REGISTRY, frozenset())
        except PermissionDenied as exc:
            assert exc.violations
    assert req.SerializeToString(deterministic=True) == before, "validation must not mutate"


def test_an_empty_registry_rejects_every_tool() -> None:
    plan = make_plan(flow("f", step("a"), step("b")))
    with pytest.raises(ValidationFailed) as caught:
        validate_request(request(plan), ToolRegistry())
    assert [v.description for v in caught.value.violations] == ['unknown tool "core.echo"'] * 2
