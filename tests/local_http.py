"""A local HTTP server on 127.0.0.1 for download tests: nothing in the tests reaches outside the machine."""
import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Routes:
    """What the server answers: `files` path → bytes (200); `cut` path → bytes of which half is sent under the
    full Content-Length before the connection closes; anything else 404. `requests` counts the GETs per path."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut: dict[str, bytes] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def serve(routes: Routes) -> Iterator[str]:
    """Serve `routes` in a thread; yields the base URL, http://127.0.0.1:PORT."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            routes.requests[self.path] = routes.requests.get(self.path, 0) + 1
            body = routes.files.get(self.path, routes.cut.get(self.path))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if self.path in routes.files else body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
