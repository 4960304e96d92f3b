"""Flower in a real headless Chromium (Debian's `chromium`, driven by Playwright): log in, see
the worker and the recent tasks, keep a screenshot (`artifacts/flower-tasks.png`), and find no
canary from a task's module, argument or result, and no credential, on any page or in any
response the pages load, nor in Flower's task API."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance._stack import operator_token_file

from .conftest import Stack, submit
from .test_flower import flower_get, flower_login, wait_flower_sees, warm_up

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
SCREENSHOT = ARTIFACTS / "flower-tasks.png"
WORKERS_SCREENSHOT = ARTIFACTS / "flower-workers.png"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    if executable is None:
        if os.geteuid() == 0:
            pytest.fail(
                "Debian's chromium is missing: `./dev.sh test` installs it "
                "(apt-get install -y chromium)"
            )
        pytest.skip(
            "Debian's chromium is missing and we are not root: "
            "run `sudo apt-get install -y chromium`"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Debian's build, never a downloaded one: Playwright only drives it.
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _canary_jobs(stack: Stack, count: int = 3) -> tuple[list[str], list[str]]:
    """Submit jobs whose module, argument and result each hold a distinct canary; wait for
    their results. Returns (task ids, canaries)."""
    client = stack.client()
    task_ids, canaries = [], []
    for _ in range(count):
        in_module = f"cmod{secrets.token_hex(8)}"
        in_argument = f"carg{secrets.token_hex(8)}"
        in_result = f"cres{secrets.token_hex(8)}"
        # The result canary is built at run time (reversed), so it is not in the source itself.
        module = (
            f"# {in_module}\nMARK = '{in_module}'\n\n"
            f"def echo(value):\n    return [value, MARK, '{in_result[::-1]}'[::-1]]\n"
        )
        resp = submit(client, module, "echo", args=[in_argument])
        assert resp.status_code == 202, resp.text
        accepted = resp.json()
        result = stack.wait_result(client, accepted["result_key"])
        assert result.status_code == 200, result.text
        assert result.json()["result"] == [in_argument, in_module, in_result]
        task_ids.append(accepted["task_id"])
        canaries += [in_module, in_argument, in_result]
    return task_ids, canaries


def _credentials(stack: Stack, password: str) -> list[str]:
    """Secrets that must never show on a page: Flower's own password, the Redis passwords, the
    operator token."""
    state = stack.state
    found = [password, operator_token_file(state).read_text().strip()]
    found += [p.read_text().strip() for p in (state / "secrets").glob("redis-*.pass")]
    return [s for s in found if s]


def _leaks(text: str, needles: list[str]) -> list[str]:
    return [n for n in needles if n in text]


def test_flower_in_a_real_browser(appliance_stack: Stack, browser: Any) -> None:
    started = time.monotonic()
    login = flower_login(appliance_stack)
    url = appliance_stack.status["flower_url"]
    warm_up(appliance_stack, login)
    task_ids, canaries = _canary_jobs(appliance_stack)
    api_tasks = wait_flower_sees(appliance_stack, login, set(task_ids))
    needles = canaries + _credentials(appliance_stack, login.password)

    # Flower's API, as JSON: the tasks are there, redacted, and nothing leaks.
    for tid in task_ids:
        task = api_tasks[tid]
        assert task["args"] == "[redacted]" and task["kwargs"] == "[redacted]"
        assert task["result"] == "'ok'"
    for path in [
        "/api/tasks",
        "/api/workers",
        "/api/task/types",
        "/api/queues/length",
        "/metrics",
        *(f"/api/task/info/{tid}" for tid in task_ids),
    ]:
        resp = flower_get(appliance_stack, path, login)
        assert resp.status_code == 200, path
        assert _leaks(resp.text, needles) == [], path

    context = browser.new_context(
        http_credentials={"username": login.username, "password": login.password},
        viewport={"width": 1440, "height": 1000},
    )
    page = context.new_page()
    responses: list[Any] = []
    page.on("response", lambda r: responses.append(r))
    pages: dict[str, str] = {}

    def visit(path: str, *ready: str) -> None:
        """Open `path`, wait until each `ready` text shows, and keep everything it loaded."""
        responses.clear()
        resp = page.goto(url + path, wait_until="networkidle")
        assert resp is not None and resp.status == 200, (path, resp and resp.status)
        for text in ready:
            page.get_by_text(text).first.wait_for(state="visible", timeout=15_000)
        page.wait_for_load_state("networkidle")
        loaded = []
        for r in responses:
            try:
                loaded.append(r.text())
            except Exception:  # noqa: BLE001 - a body the browser no longer holds (redirects)
                continue
        pages[path] = "\n".join([page.content(), page.inner_text("body"), *loaded])

    # Logged in (basic auth from the context): the dashboard lists the worker, online.
    worker = api_tasks[task_ids[0]]["worker"]
    visit("/", worker)
    visit("/workers", worker)
    assert "Online" in page.inner_text("body") or "online" in page.content()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(WORKERS_SCREENSHOT), full_page=True)
    visit(f"/worker/{worker}", worker)
    visit("/broker", "appliance")

    # The recent tasks, by id, each succeeded; then each task's own page.
    visit("/tasks", *task_ids)
    body = page.inner_text("body")
    assert "appliance.run_job" in body and "SUCCESS" in body
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    for tid in task_ids:
        visit(f"/task/{tid}", "appliance.run_job")
        assert tid in page.content() and "[redacted]" in page.inner_text("body")
    context.close()

    for path, text in pages.items():
        assert _leaks(text, needles) == [], f"a canary or credential shows on {path}"
    assert SCREENSHOT.stat().st_size > 10_000
    print(
        f"\nFlower browser test: {time.monotonic() - started:.1f} s, "
        f"{len(pages)} pages, screenshot {SCREENSHOT}"
    )


def test_browser_without_login_sees_nothing(appliance_stack: Stack, browser: Any) -> None:
    from playwright.sync_api import Error as PlaywrightError

    context = browser.new_context()
    page = context.new_page()
    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status))
    for path in ("/", "/tasks", "/metrics", "/api/tasks"):
        statuses.clear()
        try:
            page.goto(appliance_stack.status["flower_url"] + path)
        except PlaywrightError as exc:
            # Headless Chromium shows no page for a 401 it cannot answer (a Basic challenge
            # without credentials, or an empty 401 body): it reports a network error instead.
            assert "ERR_" in str(exc), path
        else:
            assert "appliance.run_job" not in page.content()
        assert statuses == [401], (path, statuses)
    context.close()
