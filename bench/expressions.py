"""Expressions (issue 20): µs per evaluation for the three shapes plans use, on today's path
(`orchestrator.server.expressions`: priced, then Google's C++ CEL runtime) and on cel-python's
own interpreter, the previous runtime (its bare interpreter, without the wrapper we had around
it, so the ratio understates the gain); plus the worst expression the bounds allow, and how
long the server's event loop can be held by one evaluation."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import celpy
from celpy import celtypes

from bench.common import Figure, record, table
from orchestrator.server.expressions import compile_condition, compile_template, scope

ITEMS = [float(i) for i in range(100)]
OUTPUT = {"count": 3.0, "name": "ada", "items": ITEMS}
SHAPES = {
    "compare `count == 3`": ("condition", "steps.a.output.count == 3"),
    "template concat": ("template", "{{ 'hi ' + steps.a.output.name + '!' }}"),
    "`all` over 100 items": ("condition", "steps.a.output.items.all(x, x >= 0)"),
}


def _median_us(run: Callable[[], Any], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def _ours(kind: str, source: str) -> Callable[[], Any]:
    activation = scope({}, {}, {"a": OUTPUT})
    if kind == "condition":
        condition = compile_condition(source)
        return lambda: condition.evaluate(activation)
    template = compile_template(source)
    return lambda: template.render(activation)


def _celpy(kind: str, source: str) -> Callable[[], Any]:
    expression = source.strip("{} ") if kind == "template" else source
    environment = celpy.Environment()
    program = environment.program(environment.compile(expression))
    activation = {
        "steps": celpy.json_to_cel({"a": {"output": OUTPUT}}),
        "params": celtypes.MapType({}),
        "vars": celtypes.MapType({}),
    }
    # `count == 3` compares a double with an int, which cel-python refuses: 3.0 for it.
    if "== 3" in expression:
        program = environment.program(environment.compile(expression.replace("3", "3.0")))
    return lambda: program.evaluate(activation)


def run(repeat: int = 2000) -> None:
    print("== expressions: median µs per evaluation (data prepared once)")
    rows = [("shape", "ours", "cel-python", "ratio")]
    for name, (kind, source) in SHAPES.items():
        ours = _median_us(_ours(kind, source), repeat)
        before = _median_us(_celpy(kind, source), max(repeat // 10, 50))
        rows.append((name, f"{ours:,.1f}", f"{before:,.1f}", f"{before / ours:,.0f}x"))
        record(
            Figure(
                f"expression {name}",
                ours,
                "µs",
                target=f">= 10x faster than cel-python ({before:,.0f} µs)",
                met=before / ours >= 10,
            )
        )
    print(table(rows))
    # The worst the bounds allow inline: the largest reading, priced just within the budget.
    worst = compile_condition("steps.a.output.items.all(a, steps.a.output.items.all(b, a >= b))")
    activation = scope({}, {}, {"a": {"items": [float(i) for i in range(45)]}}, budget=1.0)
    slowest = max(_median_us(lambda: worst.evaluate(activation), 1) for _ in range(20))
    print(f"   nested comprehension 45 x 45 inline: slowest {slowest / 1000:.2f} ms")
    record(Figure("expression worst inline", slowest / 1e6, "ms", target="< 50 ms"))


if __name__ == "__main__":
    run()
