"""A quiet loopback HTTP server for the synthetic raw images (the demo, the notebook and the tests download from it)."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

from typing_extensions import Self

from zh_t2i_base.cli import UserError


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class LoopbackServer:
    """``with LoopbackServer(dir) as srv: srv.url`` — serves ``dir`` on 127.0.0.1 (port 0 = any free port)."""

    def __init__(self, directory: str | os.PathLike, port: int = 0, host: str = "127.0.0.1"):
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"directory to serve not found: {directory}")
        handler = functools.partial(_QuietHandler, directory=str(directory))
        try:
            self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
