"""The fork server: a fresh interpreter, started with an empty environment, that forks children.

It is spawned by `Sandbox` (see `_client.py`) from whatever process wants to run code, so that
the process that forks user code has never held a credential, even when its caller has. It reads
length-prefixed JSON requests on stdin and answers on stdout, one at a time.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ._errors import SandboxError
from ._framing import read_frame, write_frame
from ._policy import Policy
from ._request import from_wire
from ._supervisor import Supervisor


def _handle(supervisor: Supervisor, frame: bytes) -> dict[str, Any]:
    try:
        wire = json.loads(frame)
        if wire.get("op") == "doctor":
            return {"layers": supervisor.layers}
        outcome = supervisor.run(from_wire(supervisor.policy, wire))
        return {"outcome": outcome.to_dict()}
    except SandboxError as exc:
        return {"error": {"code": exc.code, "message": str(exc)}}
    except (ValueError, TypeError, AttributeError) as exc:
        return {"error": {"code": "invalid_request", "message": f"bad request: {exc}"}}
    except OSError as exc:
        # fork or pipe failed (process or descriptor limits): this run failed, the server lives.
        return {"error": {"code": "sandbox_error", "message": f"cannot start a child: {exc}"}}


def main(supervisor_class: type[Supervisor] = Supervisor) -> None:
    """Serve requests until stdin closes."""
    policy = Policy.load(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    # Keep the protocol on private descriptors so nothing else can write into it.
    req_fd, resp_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    supervisor = supervisor_class(policy)
    try:
        write_frame(resp_fd, json.dumps({"ready": True, "layers": supervisor.layers}).encode())
        supervisor.prepare_next()
        while True:
            frame = read_frame(req_fd)
            if frame is None:
                return
            write_frame(resp_fd, json.dumps(_handle(supervisor, frame)).encode())
            supervisor.prepare_next()
    finally:
        supervisor.close()

if __name__ == "__main__":
    main()
