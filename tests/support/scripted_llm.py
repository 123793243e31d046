"""A scripted OpenAI-compatible server on 127.0.0.1: deterministic good, bad and hostile LLM answers for tests.

The scripts' LLM client (`--llm-backend openai`) talks to it exactly as to `vllm serve` or a hosted API. A test sets
`server.respond = fn`, where `fn(messages) -> answer` returns:
  * a string: the answer text;
  * an int: fail the request with that HTTP status (e.g. 500; the client retries, then counts a failure);
  * `"<hang>"`: never answer within the client's timeout; `"<cut>"`: close the connection without a reply.
Every request's messages are kept in `server.requests`. Runs in a thread of the test process, so a script started
with subprocess reaches it while the test waits.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class ScriptedLLM:
    model = "scripted"

    def __init__(self):
        self.respond = lambda messages: ""
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _send(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    return self._send(
                        200, {"object": "list", "data": [{"id": server.model, "object": "model"}]}
                    )
                self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(
                    self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}"
                )
                messages = body.get("messages", [])
                server.requests.append(messages)
                answer = server.respond(messages)
                if answer == "<hang>":
                    time.sleep(3600)
                    return
                if answer == "<cut>":
                    self.close_connection = True
                    self.connection.close()
                    return
                if isinstance(answer, int):
                    return self._send(answer, {"error": {"message": f"scripted HTTP {answer}"}})
                msg = {"role": "assistant", "content": answer}
                self._send(
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": server.model,
                        "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted_llm():
    """A fresh scripted server per test (see the module docstring)."""
    server = ScriptedLLM()
    yield server
    server.close()
