"""Running an app on uvicorn: in the foreground (`minillm serve`), or in a background thread on a
free port (tests and benchmarks: `run_in_thread(app) -> (base_url, stop)`)."""

from __future__ import annotations

import threading
import time
from typing import Callable


def _server(app, host: str, port: int, announce: bool = False):
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if announce and self.started:
                print(f"minillm serve: listening on {url(self)} (OpenAI API at {url(self)}/v1)", flush=True)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5))


def url(server) -> str:
    """http://host:port of a started uvicorn server (the real port when it was asked for port 0)."""
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until Ctrl-C (or SIGTERM), printing the URL once the socket is open."""
    try:
        _server(app, host, port, announce=True).run()
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the signal: a normal end
        pass
    print("minillm serve: stopped", flush=True)


def run_in_thread(app, host: str = "127.0.0.1", port: int = 0,
                  timeout: float = 60.0) -> tuple[str, Callable[[], None]]:
    """Start uvicorn in a daemon thread on a free port -> (base URL, stop). stop() shuts the
    server down (the app's engines with it) and waits for the thread."""
    server = _server(app, host, port)
    thread = threading.Thread(target=server.run, name="minillm-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout)

    return url(server), stop
