"""A stand-in for llama.cpp's `llama-server` in tests of bench.serving: takes its command line, answers
GET /health and streamed POST /v1/chat/completions as it does (one chunk per token, then a usage
chunk, then [DONE]), and writes each request's JSON body as a line to $STAND_IN_REQUESTS."""

import argparse
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("-m", "--host", "-t", "-tb", "--parallel", "-c"):
        p.add_argument(flag)
    p.add_argument("--port", type=int)
    args = p.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_) -> None:
            pass

        def do_GET(self) -> None:
            self._send(200 if self.path == "/health" else 404, b'{"status": "ok"}', "application/json")

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with open(os.environ["STAND_IN_REQUESTS"], "a") as log:
                log.write(json.dumps(body) + "\n")
            words = sum(len(m["content"].split()) for m in body["messages"])
            chunks = [{"choices": [{"index": 0, "delta": {"content": f" w{i}"}}]} for i in range(body["max_tokens"])]
            chunks.append({"choices": [], "usage": {"prompt_tokens": words, "completion_tokens": body["max_tokens"],
                                                    "total_tokens": words + body["max_tokens"]}})
            stream = "".join(f"data: {json.dumps(c | {'id': 'x', 'object': 'chat.completion.chunk', 'created': 0, 'model': 'm'})}\n\n"
                             for c in chunks) + "data: [DONE]\n\n"
            time.sleep(0.01)
            self._send(200, stream.encode(), "text/event-stream")

        def _send(self, status: int, data: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
