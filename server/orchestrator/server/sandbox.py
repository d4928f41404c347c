"""The expression sandbox: evaluations that cannot be priced within the budget run here.

A separate process (`python -m orchestrator.server.sandbox`, sharing nothing with the server)
evaluates one
expression at a time on the data it is sent and reports the CPU its evaluation took. The
server waits for the answer off the event loop; past the budget (plus a margin for the
transfer) it kills the process, starts a new one and fails the evaluation "too costly". The
process's address space is capped, so an expression that builds a huge value fails instead of
taking the machine's memory. One tenant's costly expression therefore costs the server one
budget of wall time in another process, never a stalled event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import struct
import sys
import time
from typing import Any, BinaryIO

import structlog

from orchestrator.server import expressions
from orchestrator.server.expressions import ExpressionError, Program, TooCostly

log = structlog.get_logger("orchestrator.sandbox")

# The sandbox process may map this much memory (its own interpreter included).
MEMORY_LIMIT_BYTES = 1024 * 1024 * 1024
# Wall time allowed beyond the budget for sending the data and the answer back.
TRANSFER_MARGIN_SECONDS = 0.25
START_TIMEOUT_SECONDS = 60.0
_HEADER = struct.Struct(">I")


def _write(stream: BinaryIO, message: object) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _read(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (length,) = _HEADER.unpack(header)
    return pickle.loads(stream.read(length))


def serve(memory_limit: int = MEMORY_LIMIT_BYTES) -> None:
    """The sandbox process: evaluate each (source, data) that arrives on stdin until it
    closes; answer ((kind, value), cpu seconds of the evaluation) on stdout."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    _write(answers, "ready")
    while True:
        try:
            source, data = _read(requests)
        except EOFError:
            return
        seconds = 0.0
        try:
            program = expressions._compile(source)
            activation = expressions.convert_whole(data)
            started = time.process_time()  # the evaluation's own CPU, not our preparation
            try:
                value: Any = expressions.evaluate_in_runtime(program, activation)
            finally:
                seconds = time.process_time() - started
            answer: tuple[str, Any] = ("ok", value)
        except TooCostly as exc:
            answer = ("costly", exc.message)
        except ExpressionError as exc:
            answer = ("error", exc.message)
        except MemoryError:
            answer = ("costly", "the value it builds is too large")
        _write(answers, (answer, seconds))


class Sandbox:
    """One sandbox process, used by one evaluation at a time (see the module doc)."""

    def __init__(self, *, memory_limit: int = MEMORY_LIMIT_BYTES) -> None:
        self._memory_limit = memory_limit
        self._lock = asyncio.Lock()
        self._process: asyncio.subprocess.Process | None = None
        self.killed = 0  # evaluations stopped past their budget

    async def start(self) -> None:
        """Start the process now (else on first use); starting takes a few hundred ms."""
        async with self._lock:
            await self._ensure()

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._process is not None and self._process.returncode is None:
            return self._process
        await self._stop()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator.server.sandbox",
            str(self._memory_limit),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**31 - 1,
        )
        # The budget of the first evaluation starts only once the process has imported the
        # runtime and says it is ready.
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                ready = await _receive(process)
        except (TimeoutError, EOFError, OSError, asyncio.IncompleteReadError):
            _kill(process)
            raise ExpressionError("the expression sandbox did not start") from None
        except BaseException:  # cancelled while it started: never reuse a half-started one
            _kill(process)
            raise
        if ready != "ready":
            _kill(process)
            raise ExpressionError("the expression sandbox did not start")
        self._process = process
        return process

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()

    async def close(self) -> None:
        async with self._lock:
            await self._stop()

    async def evaluate(self, program: Program, data: dict[str, Any], budget: float) -> Any:
        """The program's value on `data`, or TooCostly past `budget` seconds of CPU."""
        async with self._lock:
            process = await self._ensure()
            assert process.stdin is not None
            payload = pickle.dumps((program.source, data), protocol=pickle.HIGHEST_PROTOCOL)
            try:
                process.stdin.write(_HEADER.pack(len(payload)) + payload)
                await process.stdin.drain()
                async with asyncio.timeout(budget + TRANSFER_MARGIN_SECONDS):
                    (kind, value), seconds = await _receive(process)
            except (TimeoutError, EOFError, OSError, asyncio.IncompleteReadError):
                self.killed += 1
                await self._stop()
                log.warning("expression.stopped", source=program.source[:200], budget=budget)
                raise expressions._too_costly(program, budget, budget) from None
            except BaseException:
                # Cancelled (the run was) or an answer of the wrong shape: the pipe may hold
                # an answer nobody reads, so this process cannot serve the next evaluation.
                self._process = None
                _kill(process)
                raise
        if kind == "ok" and seconds > budget:
            raise expressions._too_costly(program, seconds, budget)
        if kind == "costly":
            raise TooCostly(f"{program.source.strip()[:80]!r}: too costly to evaluate ({value})")
        if kind == "error":
            raise ExpressionError(value)
        return value


def _kill(process: asyncio.subprocess.Process) -> None:
    # No await: this also runs while the caller is being cancelled. asyncio reaps the child.
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


async def _receive(process: asyncio.subprocess.Process) -> Any:
    assert process.stdout is not None
    (length,) = _HEADER.unpack(await process.stdout.readexactly(_HEADER.size))
    return pickle.loads(await process.stdout.readexactly(length))


async def evaluate(sandbox: Sandbox | None, program: Program, scope: expressions.Scope) -> Any:
    """One program's value: directly when it fits the budget, else in the sandbox (or, with
    no sandbox, TooCostly)."""
    evaluation = expressions.Evaluation(program, scope)
    done, value = evaluation.direct()
    if done:
        return value
    if sandbox is None:
        return expressions.evaluate(program, scope)
    return await sandbox.evaluate(program, evaluation.sandbox_data(), scope.budget)


async def check(
    sandbox: Sandbox | None, condition: expressions.Condition, scope: expressions.Scope
) -> bool:
    """A condition's bool value (see `evaluate`)."""
    return condition.check(await evaluate(sandbox, condition.program, scope))


async def render(
    sandbox: Sandbox | None, template: expressions.Template, scope: expressions.Scope
) -> Any:
    """A template rendered in `scope` (see `evaluate`); errors carry the value's path."""
    results: dict[int, Any] = {}
    for path, program in template.programs():
        if id(program) not in results:
            try:
                results[id(program)] = await evaluate(sandbox, program, scope)
            except ExpressionError as exc:
                raise ExpressionError(exc.message, path=path) from None
    return template.build(results)


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else MEMORY_LIMIT_BYTES)
