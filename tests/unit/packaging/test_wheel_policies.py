"""A wheel install finds every policy file (issue 14: the stack looked for `policies/` beside
its source tree, which a wheel does not have: it ships the directory as `appliance_policies`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# Run inside the installed copy: where each reader of a policy file looks, and that it loads.
PROBE = """
import json, sys
import appliance, sandbox
from appliance._stack import openbao, redis_server
from sandbox._policy import Policy, _default_policy_path
redis_server.load_acl_policy()
redis_server.load_leased_roles()
Policy.load()
print(json.dumps({
    "appliance": appliance.__file__,
    "sandbox": sandbox.__file__,
    "bao": str(openbao.DEFAULT_POLICIES_DIR),
    "acl": str(redis_server.DEFAULT_ACL_POLICY),
    "sandbox_policy": str(_default_policy_path()),
    "hcl": sorted(p.name for p in openbao.DEFAULT_POLICIES_DIR.glob("*.hcl")),
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel and installed (no dependencies) into a directory of its own."""
    work = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", work / "dist", ROOT], check=True)
    (wheel,) = (work / "dist").glob("*.whl")
    target = work / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", target, wheel], check=True
    )
    return target


def test_an_installed_wheel_finds_every_policy_file(installed: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    env.pop("SANDBOX_POLICY", None)
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    packaged = installed / "appliance_policies"
    # The installed copy is what ran, not the checkout.
    assert Path(found["appliance"]).is_relative_to(installed)
    assert Path(found["sandbox"]).is_relative_to(installed)
    assert Path(found["bao"]) == packaged
    assert Path(found["acl"]) == packaged / "redis-acl.json"
    assert Path(found["sandbox_policy"]) == packaged / "sandbox.json"
    shipped = sorted(p.name for p in (ROOT / "policies").iterdir() if p.is_file())
    assert sorted(p.name for p in packaged.iterdir()) == shipped
    assert found["hcl"] == [name for name in shipped if name.endswith(".hcl")]
