"""Probe service: answers /health, and on / pings the `kv` service with the pip-installed client."""

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/health":
            body = {"ok": True}
        else:
            client = redis.Redis(host="kv", port=6390, socket_timeout=3)
            body = {
                "kv_ping": client.ping(),
                "hits": client.incr("hits"),
                "redis_py": redis.__version__,
            }
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


# All interfaces of its own container: the compose file publishes the port on 127.0.0.1 only.
ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()  # noqa: S104
