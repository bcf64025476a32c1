"""A fake cloud metadata service on 127.0.0.1: AWS IMDSv2 and GCP preemption endpoints."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

AWS_PATH = "/latest/meta-data/spot/instance-action"
GCP_PATH = "/computeMetadata/v1/instance/preempted"


class FakeMetadata:
    """AWS IMDSv2 (token required) and GCP (Metadata-Flavor header required) endpoints."""

    def __init__(self) -> None:
        self.aws_action: dict | None = None
        self.gcp_preempted = False
        self.requests: list[str] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: str = "") -> None:
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self) -> None:
                state.requests.append(f"PUT {self.path}")
                ok = self.path == "/latest/api/token" and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds")
                self._send(200, "tok-123") if ok else self._send(400)

            def do_GET(self) -> None:
                state.requests.append(f"GET {self.path}")
                if self.path == AWS_PATH:
                    if self.headers.get("X-aws-ec2-metadata-token") != "tok-123":
                        return self._send(401)
                    if state.aws_action is None:
                        return self._send(404)
                    return self._send(200, json.dumps(state.aws_action))
                if self.path == GCP_PATH:
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._send(403)
                    return self._send(200, "TRUE" if state.gcp_preempted else "FALSE")
                self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
