"""Running the application: ``aiayn serve`` in the foreground, `BackgroundServer` in a thread.

The listening socket is bound here, before uvicorn starts, so that a port in use or an address
the machine does not have is a one-line `UserError` (exit 2) instead of a uvicorn traceback,
and so that ``--port 0`` can print the port the system chose.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time

from ..errors import UserError


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 lets the system choose a free one."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535 (got {port})")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restart may reuse a port whose old connections are in TIME_WAIT. A port
    # another process listens on is still refused (EADDRINUSE) on Linux and macOS.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server?); choose another with --port") from None
        if e.errno == errno.EACCES:
            raise UserError(f"no permission to listen on port {port} of {host}; use a port above 1023") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BackgroundServer:
    """Serve an ASGI app with uvicorn in a daemon thread, for tests, benchmarks and notebooks:

        with BackgroundServer(create_app(Engine("runs/lo/averaged"))) as server:
            httpx2.post(server.url + "/api/translate", json={"text": "Click OK."})

    It listens on loopback by default (a free port unless ``port`` is given) and stops when
    the ``with`` block ends.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 access_log: bool = False, start_timeout: float = 60.0):
        self.app, self.host, self.port = app, host, port
        self.log_level, self.access_log, self.start_timeout = log_level, access_log, start_timeout
        self.url: str | None = None

    def __enter__(self) -> BackgroundServer:
        import uvicorn

        sock = bind_socket(self.host, self.port)
        self.url = url_of(sock)
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level=self.log_level, access_log=self.access_log,
                                                     lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="aiayn-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                sock.close()
                raise RuntimeError(f"the server did not start within {self.start_timeout:.0f} s")
            time.sleep(0.02)
        self._sock = sock
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()

