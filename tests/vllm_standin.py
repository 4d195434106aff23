"""A stand-in for the ``vllm`` command, for CPU tests: ``vllm serve MODEL --host H --port P ...``
records its argv (and later the signal that stopped it), answers ``GET /v1/models`` with the model
and every ``--lora-modules`` name, answers chat completions with a fixed wrong solution, and exits
0 on SIGTERM. ``install(folder, record)`` writes it as ``folder/vllm`` and returns an environment
with that folder first on PATH."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SCRIPT = """#!{python}
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

argv = sys.argv[1:]
record = os.environ["VLLM_STANDIN_RECORD"]
with open(record, "w") as f:
    json.dump({{"argv": argv, "pid": os.getpid()}}, f)
host, port = argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])
names = [argv[1]]
if "--lora-modules" in argv:
    i = argv.index("--lora-modules") + 1
    while i < len(argv) and not argv[i].startswith("--"):
        names.append(argv[i].split("=", 1)[0])
        i += 1


class H(BaseHTTPRequestHandler):
    def reply(self, status, doc):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self.reply(200, {{"object": "list", "data": [{{"id": n}} for n in names]}})
        else:
            self.reply(404, {{"error": {{"message": "not found"}}}})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path != "/v1/chat/completions" or req.get("model") not in names:
            return self.reply(404, {{"error": {{"message": "model not found"}}}})
        text = "Half of it is 3, so it is 3 + 1.\\nThe answer is 4."
        self.reply(200, {{
            "id": "x", "object": "chat.completion", "model": req["model"],
            "choices": [{{"index": 0, "message": {{"role": "assistant", "content": text}},
                          "finish_reason": "stop"}}],
            "usage": {{"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}},
        }})

    def log_message(self, *a):
        pass


def stop(signum, frame):
    with open(record + ".signal", "w") as f:
        f.write(signal.Signals(signum).name)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
HTTPServer((host, port), H).serve_forever()
"""


def install(folder: Path, record: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "vllm"
    exe.write_text(SCRIPT.format(python=sys.executable))
    exe.chmod(0o755)
    env = {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}
    env["VLLM_STANDIN_RECORD"] = str(record)
    return env
