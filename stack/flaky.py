"""A local HTTP endpoint that fails N times, then answers: retries shown with no internet.

Used by the retry demo, client.py and the tests. ``demos.FlakyServer`` is this class.
"""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["FlakyServer"]


class FlakyServer:
    def __init__(self, failures, host="127.0.0.1", bind="127.0.0.1"):
        self.failures, self.requests = failures, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                status = 503 if outer.requests <= outer.failures else 200
                body = b"busy, try again" if status == 503 else b"hello from the flaky server"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep the demo's output clean
                pass

        self.server = ThreadingHTTPServer((bind, 0), Handler)
        self.url = f"http://{host}:{self.server.server_port}/flaky"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
