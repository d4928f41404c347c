"""CEL conditions and `{{ expr }}` templates: typing, interpolation, errors, safety."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.server.expressions import (
    ExpressionError,
    compile_condition,
    compile_template,
    scope,
)

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


def render(value: Any) -> Any:
    return compile_template(value).render(SCOPE)


def test_single_template_keeps_the_json_type() -> None:
    assert render("{{ steps.fetch.output.count }}") == 3.0
    assert render("{{steps.fetch.output.items}}") == [1.0, 2.0, 3.0]
    assert render("{{ steps.fetch.output.nested }}") == {"k": "v"}
    assert render("{{ steps.fetch.output.ok }}") is True
    assert render("{{ steps.empty.output }}") is None
    assert render("{{ size(params.tags) }}") == 2
    assert isinstance(render("{{ size(params.tags) }}"), int)


def test_text_around_a_template_interpolates_compact_json() -> None:
    assert render("hi {{ params.name }}!") == "hi ada!"
    assert render(" {{ params.name }}") == " ada", "whitespace outside the braces is text"
    assert render("{{ params.name }}{{ vars.greeting }}") == "adahello"
    assert render("n={{ params.count }} r={{ params.ratio }}") == "n=3 r=2.5"
    assert render("items={{ steps.fetch.output.items }}") == "items=[1,2,3]"
    assert render("m={{ steps.fetch.output.nested }}") == 'm={"k":"v"}'
    assert render("b={{ steps.fetch.output.ok }} z={{ steps.empty.output }}") == "b=true z=null"


def test_nested_values_render_recursively_and_leave_plain_values_alone() -> None:
    value = {
        "url": "https://x/{{ params.name }}",
        "headers": {"x-count": "{{ steps.fetch.output.count }}"},
        "list": ["{{ vars.greeting }}", 1.5, None, False, {"deep": "{{ params.tags }}"}],
        "plain": "no templates } here }}",
    }
    assert render(value) == {
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
    assert render("{{ {'a': {'b': 1}} }}") == {"a": {"b": 1}}
    assert render("{{ '}}' }}") == "}}"
    assert render("literal {{ '{{' }} braces") == "literal {{ braces"


def test_steps_with_non_identifier_ids_are_read_by_index() -> None:
    assert render('{{ steps["step-with-dash"].output.value }}') == "dashed"


@pytest.mark.parametrize(
    "source",
    [
        "{{ steps.fetch.output.missing }}",
        "{{ steps.never_ran.output }}",
        "{{ params.tags[5] }}",
        "{{ nothing_here }}",
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


def test_json_numbers_compare_with_int_literals() -> None:
    # The documented choice: doubles stay doubles, numeric operators mix int and double.
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
    assert holds("params.ratio * 2 == 5")
    assert holds("7 / 2 == 3"), "int arithmetic stays int"
    assert holds("params.count / 2 == 1.5"), "a JSON number divides as a double"
    assert render("{{ params.count + 1 }}") == 4.0
    assert render("{{ 7 / 2 }}") == 3


def test_scope_exposes_only_completed_steps() -> None:
    partial = scope({}, {}, {"a": 1})
    assert compile_template("{{ steps.a.output }}").render(partial) == 1
    with pytest.raises(ExpressionError):
        compile_template("{{ steps.b.output }}").render(partial)


def test_unsupported_values_are_expression_errors() -> None:
    with pytest.raises(ExpressionError):
        compile_template({"a": object()})
    with pytest.raises(ExpressionError):
        scope({"a": object()}, {}, {})
