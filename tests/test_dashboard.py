"""The dashboard in a real browser: Playwright driving Debian's Chromium, headless, against a
real server on free ports (gRPC for the test's own calls, HTTP for the page).

`ORCHESTRATOR_SCREENSHOTS=docs` writes the README's screenshots (docs/img/) as it goes."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from orchestrator.server.app import Server
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import echo_plan, make_settings, md, plan_of, running
from tests.test_security import key_file

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "img"
WAIT = 30_000  # ms: what the page gets to show a change (it usually takes milliseconds)

STEPPED = plan_of(
    {"stepId": "prepare", "tool": "core.echo", "parameters": {"ready": True}},
    {
        "stepId": "work",
        "tool": "core.wait",
        "parameters": {"seconds": 6},
        "dependsOn": ["prepare"],
    },
    {"stepId": "report", "tool": "core.echo", "parameters": {"done": "{{ steps.work.output }}"}},
)
ASK = plan_of(
    {
        "stepId": "choose",
        "tool": "core.clarify",
        "parameters": {
            "category": "multiple_choice",
            "prompt": "Deploy where?",
            "options": ["staging", "production"],
            "argument_name": "environment",
        },
    },
    {"stepId": "deploy", "tool": "core.echo", "parameters": {"to": "{{ steps.choose.output }}"}},
)
SLOW = plan_of({"stepId": "w", "tool": "core.wait", "parameters": {"seconds": 60}})


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1200, "height": 800})
    opened = await context.new_page()
    try:
        yield opened
    finally:
        await context.close()


async def open_dashboard(page: Page, server: Server, tenant: str, path: str = "") -> None:
    await page.goto(f"http://{server.http_address}/?tenant={tenant}{path}")
    # The tenant went to the browser's storage, not the address bar.
    assert "tenant=" not in page.url


async def shoot(page: Page, name: str) -> None:
    if os.environ.get("ORCHESTRATOR_SCREENSHOTS") == "docs":
        SHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SHOTS / name), full_page=True)


async def execute(
    stub: pb_grpc.OrchestratorServiceAsyncStub, tenant: str, plan: pb.ExecutablePlan, **labels: str
) -> str:
    response = await stub.Execute(
        pb.ExecuteRequest(executable_plan=plan, labels=labels), metadata=md(tenant)
    )
    return response.run_id


async def test_a_run_appears_and_its_steps_move_live(
    server: Server, stub: pb_grpc.OrchestratorServiceAsyncStub, tenant: str, page: Page
) -> None:
    await open_dashboard(page, server, tenant)
    await expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    first = await execute(stub, tenant, echo_plan(2), team="payments")
    row = page.locator(f'tr[data-run="{first}"]')
    await expect(row).to_be_visible(timeout=WAIT)  # no reload: WatchExecutions brought it
    await expect(row.locator(".status")).to_have_text("COMPLETED", timeout=WAIT)
    run_id = await execute(stub, tenant, STEPPED, team="search", env="staging")
    await expect(page.locator(f'tr[data-run="{run_id}"]')).to_be_visible(timeout=WAIT)
    # The filters: by status and by label.
    await page.select_option("select[name=status]", "COMPLETED")
    await expect(page.locator(f'tr[data-run="{first}"]')).to_be_visible()
    await page.select_option("select[name=status]", "")
    await page.fill("input[name=label]", "team=search")
    await expect(page.locator(f'tr[data-run="{first}"]')).to_have_count(0)
    await expect(page.locator(f'tr[data-run="{run_id}"]')).to_be_visible()
    await page.fill("input[name=label]", "")
    await shoot(page, "dashboard-list.png")

    await page.locator(f'tr[data-run="{run_id}"] a').click()
    work = page.locator('tr[data-step="work"] .step-status')
    await expect(work).to_have_text("RUNNING", timeout=WAIT)
    await shoot(page, "dashboard-run.png")
    await expect(work).to_have_text("COMPLETED", timeout=WAIT)
    await expect(page.locator("[data-run-status]")).to_have_text("COMPLETED", timeout=WAIT)
    await expect(page.locator(".timeline li").first).to_be_visible()


async def test_answering_a_clarification_lets_the_run_finish(
    server: Server, stub: pb_grpc.OrchestratorServiceAsyncStub, tenant: str, page: Page
) -> None:
    run_id = await execute(stub, tenant, ASK)
    await open_dashboard(page, server, tenant, f"#/runs/{run_id}")
    form = page.locator('form.clarification[data-step="choose"]')
    await expect(form).to_contain_text("Deploy where?", timeout=WAIT)
    await form.get_by_role("button", name="production").click()
    await expect(page.locator("[data-run-status]")).to_have_text("COMPLETED", timeout=WAIT)
    await expect(page.locator('tr[data-step="deploy"]')).to_contain_text("production")


async def test_cancel_from_the_page_and_pause_of_a_finished_run(
    server: Server, stub: pb_grpc.OrchestratorServiceAsyncStub, tenant: str, page: Page
) -> None:
    run_id = await execute(stub, tenant, SLOW)
    await open_dashboard(page, server, tenant, f"#/runs/{run_id}")
    await expect(page.locator("[data-run-status]")).to_have_text("RUNNING", timeout=WAIT)
    await page.get_by_role("button", name="Cancel").click()
    await expect(page.locator("[data-run-status]")).to_have_text("CANCELLED", timeout=WAIT)
    got = await stub.GetExecution(pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant))
    assert got.execution.status == pb.EXECUTION_STATUS_CANCELLED

    await page.get_by_role("button", name="Pause").click()
    problem = page.get_by_role("alert")
    await expect(problem).to_contain_text("PAUSE_FAILED", timeout=WAIT)


async def test_a_wrong_api_key_shows_its_reason(tmp_path: Path, page: Page) -> None:
    tenant = str(uuid.uuid4())
    keys = key_file(tmp_path / "keys.json", {"right-key": [tenant]})
    async with running(make_settings(tmp_path, auth_keys=str(keys))) as srv:
        await open_dashboard(page, srv, tenant)
        await page.fill("input[name=apiKey]", "wrong-key")
        await page.get_by_role("button", name="Use").click()
        await expect(page.get_by_role("alert")).to_contain_text("API_KEY_INVALID", timeout=WAIT)
        # The key is kept in the browser's storage, never in the address.
        assert "wrong-key" not in page.url
        await page.fill("input[name=apiKey]", "right-key")
        await page.get_by_role("button", name="Use").click()
        await expect(page.get_by_role("alert")).to_have_count(0, timeout=WAIT)
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = pb_grpc.OrchestratorServiceStub(channel)
            auth = (*md(tenant), ("authorization", "Bearer right-key"))
            run = await stub.Execute(pb.ExecuteRequest(executable_plan=echo_plan(1)), metadata=auth)
        await expect(page.locator(f'tr[data-run="{run.run_id}"]')).to_be_visible(timeout=WAIT)
