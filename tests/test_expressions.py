"""CEL conditions and `{{ expr }}` templates: typing, interpolation, errors, safety."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator.server.expressions import (
    Evaluation,
    ExpressionError,
    compile_condition,
    compile_template,
    scope,
)
from orchestrator.server.sandbox import TRANSFER_MARGIN_SECONDS, Sandbox, check, render

# What the engine passes in: Struct-derived JSON, where every number is a float.
SCOPE = scope(
    params={"name": "ada", "count": 3.0, "ratio": 2.5, "tags": ["a", "b"]},
    vars={"greeting": "hello"},
    step_outputs={
        "fetch": {"count": 3.0, "items": [1.0, 2.0, 3.0], "ok": True, "nested": {"k": "v"}},
        "step-with-dash": {"value": "dashed"},
        "empty": None,
    },
)


def rendered(value: Any) -> Any:
    return compile_template(value).render(SCOPE)


def test_single_template_keeps_the_json_type() -> None:
    assert rendered("{{ steps.fetch.output.count }}") == 3.0
    assert rendered("{{steps.fetch.output.items}}") == [1.0, 2.0, 3.0]
    assert rendered("{{ steps.fetch.output.nested }}") == {"k": "v"}
    assert rendered("{{ steps.fetch.output.ok }}") is True
    assert rendered("{{ steps.empty.output }}") is None
    assert rendered("{{ size(params.tags) }}") == 2
    assert isinstance(rendered("{{ size(params.tags) }}"), int)


def test_text_around_a_template_interpolates_compact_json() -> None:
    assert rendered("hi {{ params.name }}!") == "hi ada!"
    assert rendered(" {{ params.name }}") == " ada", "whitespace outside the braces is text"
    assert rendered("{{ params.name }}{{ vars.greeting }}") == "adahello"
    assert rendered("n={{ params.count }} r={{ params.ratio }}") == "n=3 r=2.5"
    assert rendered("items={{ steps.fetch.output.items }}") == "items=[1,2,3]"
    assert rendered("m={{ steps.fetch.output.nested }}") == 'm={"k":"v"}'
    assert rendered("b={{ steps.fetch.output.ok }} z={{ steps.empty.output }}") == "b=true z=null"


def test_nested_values_render_recursively_and_leave_plain_values_alone() -> None:
    value = {
        "url": "https://x/{{ params.name }}",
        "headers": {"x-count": "{{ steps.fetch.output.count }}"},
        "list": ["{{ vars.greeting }}", 1.5, None, False, {"deep": "{{ params.tags }}"}],
        "plain": "no templates } here }}",
    }
    assert rendered(value) == {
        "url": "https://x/ada",
        "headers": {"x-count": 3.0},
        "list": ["hello", 1.5, None, False, {"deep": ["a", "b"]}],
        "plain": "no templates } here }}",
    }


def test_rendering_returns_fresh_containers() -> None:
    template = compile_template({"a": [1, 2]})
    first = template.render(SCOPE)
    first["a"].append(3)
    assert template.render(SCOPE) == {"a": [1, 2]}


def test_braces_inside_cel_literals_do_not_close_the_template() -> None:
    assert rendered("{{ {'a': {'b': 1}} }}") == {"a": {"b": 1}}
    assert rendered("{{ '}}' }}") == "}}"
    assert rendered("literal {{ '{{' }} braces") == "literal {{ braces"


def test_steps_with_non_identifier_ids_are_read_by_index() -> None:
    assert rendered('{{ steps["step-with-dash"].output.value }}') == "dashed"


@pytest.mark.parametrize(
    "source",
    [
        "{{ steps.fetch.output.missing }}",
        "{{ steps.never_ran.output }}",
        "{{ params.tags[5] }}",
        "{{ 'x' * 3 }}",
        "{{ 1 / 0 }}",
        "{{ params.ratio / 0.0 }}",  # infinity has no JSON form
    ],
)
def test_evaluation_errors_are_expression_errors_with_the_path(source: str) -> None:
    template = compile_template({"headers": {"x": source}})
    with pytest.raises(ExpressionError) as caught:
        template.render(SCOPE)
    assert caught.value.path == "headers.x"
    assert str(caught.value).startswith("headers.x: ")


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"url": "{{ 1 + }}"}, "url"),
        ({"headers": {"x": "{{ params.name"}}, "headers.x"),
        ({"list": ["ok", "a {{ }} b"]}, "list[1]"),
        ({"odd key": "{{ ) }}"}, '["odd key"]'),
        ({"unknown": "{{ nothing_here }}"}, "unknown"),
        ("{{ 'unterminated }}", ""),
    ],
)
def test_compile_errors_name_the_path_inside_the_value(value: Any, path: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_template(value)
    assert caught.value.path == path
    assert [p.path for p in caught.value.problems] == [path]


def test_compile_template_reports_every_problem() -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_template({"a": "{{ 1 + }}", "b": "fine", "c": ["{{ x", "{{ ( }}"]})
    assert [p.path for p in caught.value.problems] == ["a", "c[0]", "c[1]"]


def test_references_are_the_step_ids_read_by_templates() -> None:
    template = compile_template(
        {
            "a": "{{ steps.fetch.output.count + size(steps['step-with-dash'].output) }}",
            "b": ["x {{ has(steps.other.output) }}", "{{ params.name }}", "steps.fake"],
            "c": "{{ 'steps.not_a_reference' }}",
        }
    )
    assert template.references() == {"fetch", "step-with-dash", "other"}
    assert template.references_by_path() == {"a": {"fetch", "step-with-dash"}, "b[0]": {"other"}}


def test_conditions_evaluate_to_bool() -> None:
    assert compile_condition("steps.fetch.output.ok == true").evaluate(SCOPE) is True
    assert compile_condition("params.name == 'bob'").evaluate(SCOPE) is False
    assert compile_condition("'a' in params.tags && vars.greeting.startsWith('he')").evaluate(SCOPE)
    assert compile_condition("steps.fetch.output.ok").references() == {"fetch"}


@pytest.mark.parametrize("source", ["params.count", "params.name", "steps.fetch.output.items"])
def test_a_condition_that_is_not_bool_is_an_error(source: str) -> None:
    condition = compile_condition(source)
    with pytest.raises(ExpressionError, match="must be a bool"):
        condition.evaluate(SCOPE)


@pytest.mark.parametrize("source", ["", "   ", "1 +", "a ==", "(", "steps.", "a b", "x" * 5000])
def test_conditions_that_do_not_parse_are_rejected_at_compile_time(source: str) -> None:
    with pytest.raises(ExpressionError):
        compile_condition(source)


def test_condition_evaluation_errors_are_expression_errors() -> None:
    condition = compile_condition("steps.fetch.output.missing > 1")
    with pytest.raises(ExpressionError, match="missing"):
        condition.evaluate(SCOPE)


def test_expressions_cannot_run_python(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    attempts = [
        "__import__('os').system('touch " + str(marker) + "')",
        "open('/etc/passwd')",
        "eval('1')",
        "params.__class__",
        "params.name.__class__.__mro__",
        "params.name.upper()",
        "exec('import os')",
    ]
    for source in attempts:
        with pytest.raises(ExpressionError):
            compile_condition(source).evaluate(SCOPE)
        with pytest.raises(ExpressionError):
            compile_template("{{ " + source + " }}").render(SCOPE)
    assert not marker.exists()


def test_nesting_is_bounded() -> None:
    four_deep = "[1].map(a, [1].map(b, [1].map(c, [1].map(d, d))))"
    with pytest.raises(ExpressionError, match="nested comprehensions"):
        compile_condition(f"size({four_deep}) == 1")
    three_deep = "[1].map(a, [1].map(b, [1].map(c, c)))"
    assert compile_condition(f"size({three_deep}) == 1").evaluate(SCOPE) is True
    with pytest.raises(ExpressionError):
        compile_condition("(" * 300 + "1" + ")" * 300 + " == 1")


def test_json_numbers_are_ints_when_whole() -> None:
    # The documented choice (README "Expressions"): a whole JSON number is an int, any other a
    # double; int and double compare by value, arithmetic needs one type.
    def holds(source: str) -> bool:
        return compile_condition(source).evaluate(SCOPE)

    assert holds("steps.fetch.output.count == 3")
    assert holds("steps.fetch.output.count == 3.0")
    assert holds("3 == steps.fetch.output.count")
    assert holds("steps.fetch.output.count != 4")
    assert holds("2 < steps.fetch.output.count && steps.fetch.output.count <= 3")
    assert holds("size(steps.fetch.output.items) == steps.fetch.output.count")
    assert holds("3 in steps.fetch.output.items")
    assert holds("params.count + 1 == 4")
    assert holds("params.ratio * 2.0 == 5.0")
    assert holds("params.ratio > 2 && params.ratio < 3"), "int and double compare by value"
    assert holds("7 / 2 == 3"), "int arithmetic stays int"
    assert holds("params.count / 2 == 1"), "a whole JSON number divides as an int"
    assert holds("double(params.count) / 2.0 == 1.5")
    assert rendered("{{ params.count + 1 }}") == 4
    assert rendered("{{ 7 / 2 }}") == 3
    assert rendered("{{ string(2.0) }}") == "2"


def test_mixing_int_and_double_arithmetic_is_an_error_that_says_what_to_write() -> None:
    with pytest.raises(ExpressionError, match=r"\(double, int\).*double\(x\)"):
        compile_condition("params.ratio * 2 == 5.0").evaluate(SCOPE)


def test_has_tests_presence_of_keys_and_steps() -> None:
    def holds(source: str) -> bool:
        return compile_condition(source).evaluate(SCOPE)

    assert holds("has(steps.fetch)")
    assert not holds("has(steps.never_ran)")
    assert holds("has(params.name) && !has(params.nope)")
    assert holds("'fetch' in steps && !('never_ran' in steps)")
    with pytest.raises(ExpressionError, match="no such key"):
        holds("has(steps.never_ran.output)")


def test_paths_resolve_directly_whatever_the_size() -> None:
    big = {"items": [{"id": float(i), "name": "x" * 50} for i in range(50_000)]}
    partial = scope(big, {}, {"a": big})
    assert compile_template("{{ steps.a.output.items }}").render(partial) is big["items"]
    assert compile_template("{{ params['items'][49999].id }}").render(partial) == 49999.0
    with pytest.raises(ExpressionError, match="index 50000 out of range"):
        compile_template("{{ params.items[50000] }}").render(partial)
    with pytest.raises(ExpressionError, match="cannot select"):
        compile_template("{{ params.items.id }}").render(partial)


def test_an_evaluation_reads_only_what_it_names() -> None:
    # A small field beside a large one costs what the small field costs.
    big = {"flag": True, "count": 2.0, "items": ["x" * 100] * 50_000}
    partial = scope(big, {}, {"a": big}, budget=0.005)
    assert compile_condition("params.flag && steps.a.output.count + 1 == 3").evaluate(partial)


NESTED = "steps.a.output.items.all(a, steps.a.output.items.all(b, a + b >= 0))"


def test_too_costly_evaluations_fail_with_the_estimate() -> None:
    items = {"items": [float(i) for i in range(300)]}
    with pytest.raises(ExpressionError, match="too costly"):
        compile_condition(NESTED).evaluate(scope({}, {}, {"a": items}))


async def test_what_cannot_be_priced_runs_in_the_sandbox_within_the_budget() -> None:
    sandbox = Sandbox()
    try:
        await sandbox.start()
        condition = compile_condition(NESTED)
        small = scope({}, {}, {"a": {"items": [float(i) for i in range(50)]}})
        with pytest.raises(ExpressionError, match="too costly"):
            condition.evaluate(small)  # priced above the budget: not inline
        assert await check(sandbox, condition, small) is True
        # Past the runtime's iteration budget, or past the CPU budget: too costly.
        large = scope({}, {}, {"a": {"items": [float(i) for i in range(300)]}})
        with pytest.raises(ExpressionError, match="too costly"):
            await check(sandbox, condition, large)
        bomb = compile_condition(string_bomb(3000, 12))
        started = time.monotonic()
        with pytest.raises(ExpressionError, match="too costly"):
            await check(sandbox, bomb, small)
        assert time.monotonic() - started < 2.0
        # An evaluation that runs on is stopped at the budget: the process is killed.
        hundred = "[" + ", ".join(str(i) for i in range(99)) + "]"
        slow = compile_condition(
            f"{hundred}.all(a, {hundred}.all(b, size(params.s + params.s) > 0))"
        )
        started = time.monotonic()
        with pytest.raises(ExpressionError, match="too costly"):
            await check(sandbox, slow, scope({"s": "x" * 100_000}, {}, {}))
        assert time.monotonic() - started < 2.0
        assert sandbox.killed == 1
        # A new process takes over after a kill.
        assert await check(sandbox, condition, small) is True
        template = compile_template({"n": "{{ size(steps.a.output.items.filter(x, x > 1)) }}"})
        items = scope({}, {}, {"a": {"items": [float(i) for i in range(400)]}})
        assert await render(sandbox, template, items) == {"n": 398}
    finally:
        await sandbox.close()


def string_bomb(literal: int, terms: int) -> str:
    """A condition of about 1,000 characters that builds literal * terms**3 characters."""

    def cat(name: str) -> str:
        return " + ".join([name] * terms)

    return (
        f"['{'x' * literal}'].map(a, [{cat('a')}].map(b, [{cat('b')}]"
        f".map(c, size({cat('c')}))))[0][0][0] > 0"
    )


def test_the_iteration_budget_of_the_runtime_holds() -> None:
    from orchestrator.server.expressions import ITERATION_BUDGET, _compile, evaluate_in_runtime

    program = _compile("[1, 2, 3, 4, 5, 6, 7, 8, 9, 10].all(a, params.items.all(b, b >= 0))")
    data = {"params": {"items": list(range(ITERATION_BUDGET // 10 + 1))}}
    with pytest.raises(ExpressionError, match="more than 10,000 comprehension iterations"):
        evaluate_in_runtime(program, data)


def test_scope_exposes_only_completed_steps() -> None:
    partial = scope({}, {}, {"a": 1})
    assert compile_template("{{ steps.a.output }}").render(partial) == 1
    with pytest.raises(ExpressionError):
        compile_template("{{ steps.b.output }}").render(partial)


def test_unsupported_values_are_expression_errors() -> None:
    with pytest.raises(ExpressionError):
        compile_template({"a": object()})
    with pytest.raises(ExpressionError):
        compile_condition("size(params.a) > 0").evaluate(scope({"a": [object()]}, {}, {}))


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """One sandbox process for every example of a test."""
    process = Sandbox()
    await process.start()
    yield process
    await process.close()


@st.composite
def hostile_cases(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """An expression that tries to cost a lot (nested comprehensions at the bound, long `+`
    chains, deep nesting, big literals) over data up to the largest a request carries."""
    n = draw(st.sampled_from([0, 1, 10, 100, 1_000, 50_000]))
    data: dict[str, Any] = {
        "items": [float(i) for i in range(n)],
        "text": "x" * draw(st.sampled_from([0, 10, 10_000, 1_000_000])),
        "nested": {"a": {"b": [{"c": "y" * 100}] * draw(st.integers(0, 2_000))}},
    }
    term = draw(st.sampled_from(["params.text", "params.items", "'ab'", "[1, 2]", "x"]))
    chain = " + ".join([term] * draw(st.integers(1, 25)))
    depth = draw(st.integers(1, 3))
    body = draw(
        st.sampled_from(
            [
                "x >= 0",
                f"size({chain}) > 0",
                "x in params.items",
                "params.items == params.items",
                "params.text.matches('(x+)+$')",
                "string(x) + params.text != ''",
            ]
        )
    )
    source = body
    for _ in range(depth):
        lst = draw(st.sampled_from(["params.items", "params.nested.a.b", "[1, 2, 3]"]))
        macro = draw(st.sampled_from(["all", "exists", "map", "filter"]))
        inner = source if macro in ("all", "exists", "filter") else f"{source} == true"
        source = f"{lst}.{macro}(x, {inner})"
        if macro in ("map", "filter"):
            source = f"size({source}) >= 0"
    if draw(st.booleans()):
        parens = draw(st.integers(1, 40))
        source = "(" * parens + source + ")" * parens
    return source, data


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=hostile_cases())
async def test_hostile_evaluations_stay_within_the_budget(
    sandbox: Sandbox, case: tuple[str, dict[str, Any]]
) -> None:
    source, data = case
    try:
        condition = compile_condition(source)
    except ExpressionError:
        event("refused at submit")
        return
    values = scope(data, {}, {})
    started = time.monotonic()
    evaluation = Evaluation(condition.program, values)
    try:
        done, _ = evaluation.direct()
        event("inline" if done else "sandbox")
    except ExpressionError as exc:
        event("too costly inline" if "too costly" in exc.message else "error inline")
    held = time.monotonic() - started
    assert held < 0.05, f"{source[:200]!r} held the loop for {held * 1000:.0f} ms"
    await sandbox.start()  # a restart after a kill is not the evaluation's time
    started = time.monotonic()
    try:
        await check(sandbox, condition, values)
    except ExpressionError as exc:
        event("too costly" if "too costly" in exc.message else "evaluation error")
    took = time.monotonic() - started
    assert took < values.budget + TRANSFER_MARGIN_SECONDS + 0.5, f"{source[:200]!r}: {took:.2f}s"


async def test_a_cancelled_evaluation_leaves_the_sandbox_usable(sandbox: Sandbox) -> None:
    """Found by the hostile fuzzing: a run cancelled while its condition was in the sandbox
    left that answer in the pipe, and the next evaluation read it as its own."""
    hundred = "[" + ", ".join(str(i) for i in range(99)) + "]"
    slow = compile_condition(f"{hundred}.all(a, {hundred}.all(b, size(params.s + params.s) > 0))")
    values = scope({"s": "x" * 100_000}, {}, {})
    for delay in (0.0, 0.01, 0.05):
        task = asyncio.create_task(check(sandbox, slow, values))
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        condition = compile_condition(NESTED)
        small = scope({}, {}, {"a": {"items": [float(i) for i in range(50)]}})
        assert await check(sandbox, condition, small) is True
