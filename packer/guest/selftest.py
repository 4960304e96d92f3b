"""The VM's boot self-test (appliance-selftest.service): one line on the console, `SELFTEST: OK`
or `SELFTEST: FAIL: <why>`, after the API's /readyz over TLS, a signed add(2, 40) through the
whole appliance (API, queue, worker, sandbox, sealed result) and `appliance audit verify`. The
worker's sandbox runs a job only with every required layer active (the policy degrades none), so
the job is its `sandbox doctor`: this unit, unprivileged, could not run one in the worker's
delegated cgroup; the image's build runs `sandbox doctor` under the worker unit's hardening.
While OpenBao is sealed it says so once and waits (the operator runs `appliance unseal`, or the
seed carries the shares)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx

STATE = os.environ.get("APPLIANCE_STATE", "/var/lib/appliance")
APPLIANCE = "/usr/local/bin/appliance"
ADD = "/usr/local/lib/appliance/add.py"
#: How long the API may take to become ready (first boot under TCG: OpenBao's init and the
#: bootstrap take minutes), and how long a sealed OpenBao is waited for.
READY_WITHIN = float(os.environ.get("APPLIANCE_SELFTEST_WAIT", "1800"))


def say(line: str) -> None:
    print(line, flush=True)


def run(*argv: str, timeout: float = 300) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(argv[:4])} exited {done.returncode}: {' | '.join(tail)}")
    return done.stdout


def sealed() -> bool | None:
    """OpenBao's seal state on loopback, None while it does not answer."""
    try:
        with open(os.path.join(STATE, "stack.json")) as f:
            port = json.load(f)["ports"]["bao"]
        reply = httpx.get(f"http://127.0.0.1:{port}/v1/sys/seal-status", timeout=5)
        return bool(reply.json()["sealed"])
    except (OSError, ValueError, KeyError, httpx.HTTPError):
        return None


def ready(url: str, ca: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=10, verify=ca).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> int:
    deadline = time.monotonic() + READY_WITHIN
    said_sealed = False
    while not os.path.isfile(os.path.join(STATE, ".initialised")) or not os.path.isfile(
        os.path.join(STATE, "stack.json")
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("the first boot's initialisation did not finish")
        time.sleep(2)
    status = json.loads(run(APPLIANCE, "--state", STATE, "status", "--json"))
    url = status["api_url"]
    if not url.startswith("https://"):
        raise RuntimeError(f"the API is not on TLS: {url}")
    ca = os.path.join(STATE, "tls", "ca.crt")
    while not ready(url, ca):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/readyz did not answer 200 in {READY_WITHIN:.0f} s")
        if sealed() and not said_sealed:
            say("SELFTEST: WAITING: OpenBao is sealed: run `appliance unseal`")
            said_sealed = True
        time.sleep(3)
    out = run(
        APPLIANCE,
        "--state",
        STATE,
        "submit",
        ADD,
        "add",
        "--args",
        "[2, 40]",
        "--wait",
        timeout=600,
    )
    result = json.loads(out)
    if result.get("status") != "succeeded" or result.get("result", {}).get("value") != 42:
        raise RuntimeError(f"add(2, 40): {json.dumps(result)[:200]}")
    run(APPLIANCE, "--state", STATE, "audit", "verify")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception as exc:  # noqa: BLE001 - the console line must say what failed, whatever it was
        say(f"SELFTEST: FAIL: {type(exc).__name__}: {exc}"[:400])
        sys.exit(1)
    say("SELFTEST: OK")
    if os.path.exists(os.path.join(STATE, "unseal-shares.age")):
        say(
            "SELFTEST: NOTE: OpenBao's unseal shares are kept, encrypted to operator.pub, in "
            f"{STATE}/unseal-shares.age until you saved them: `appliance shares show`, then "
            "`appliance shares ack`"
        )
    sys.exit(code)
