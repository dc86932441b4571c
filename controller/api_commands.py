"""``greenfleet api run|token`` and ``controller run --api``: serve the read-only HTTP API.

The API (controller.api) binds to 127.0.0.1 unless told otherwise. Binding it anywhere else
needs a token (``--token-file`` or ``$GREENFLEET_API_TOKEN``): remote clients then send
``Authorization: Bearer <token>``; local ones need nothing. Nothing here is needed by the other
commands: FastAPI and uvicorn are imported only when the API is served.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.errors import InvalidRequest
from controller.home import Home

log = logging.getLogger(__name__)

TOKEN_ENV = "GREENFLEET_API_TOKEN"
DEFAULT_PORT = 8080
START_TIMEOUT_S = 15.0


def _loopback(host: str) -> bool:
    from controller.api import is_loopback

    return is_loopback(host)


def read_token(token_file: str | None) -> str | None:
    """The token from ``token_file`` (its first line), else from $GREENFLEET_API_TOKEN."""
    if token_file:
        try:
            text = Path(token_file).read_text()
        except OSError as exc:
            raise InvalidRequest(f"cannot read the API token file {token_file}: {exc}") from exc
        lines = text.strip().splitlines()
        if not lines or not lines[0].strip():
            raise InvalidRequest(f"the API token file {token_file} is empty")
        return lines[0].strip()
    value = os.environ.get(TOKEN_ENV, "").strip()
    return value or None


def access(bind: str, token_file: str | None, option: str = "--token-file") -> str | None:
    """The token to serve with: required (InvalidRequest naming ``option``) for a bind address
    other than loopback, and checked for length when given."""
    from controller.api import check_token

    token = read_token(token_file)
    if token is None and not _loopback(bind):
        raise InvalidRequest(
            f"refusing to serve the API on {bind} without a token: pass {option} FILE or set "
            f"{TOKEN_ENV} (remote clients then send 'Authorization: Bearer <token>'); "
            "`greenfleet api token FILE` makes one"
        )
    return check_token(token, allow_remote=token is not None)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a port in use is a clear error at start."""
    sock: socket.socket | None = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise InvalidRequest(f"cannot serve the API on {host}:{port}: {exc}") from exc
    return sock


class ApiServer:
    """uvicorn serving :func:`controller.api.create_app` in a thread of its own.

    ``start`` returns once it listens (``port`` is then the real port, also with port 0);
    ``stop`` asks it to finish and waits for it."""

    def __init__(
        self,
        home: Home,
        bind: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        token: str | None = None,
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        access_log: bool = False,
    ) -> None:
        if token is None and not _loopback(bind):
            raise InvalidRequest(f"refusing to serve the API on {bind} without a token")
        self.home = home
        self.bind = bind
        self.port = port
        self.token = token
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.access_log = access_log
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"{scheme}://{host}:{self.port}"

    def start(self) -> ApiServer:
        import uvicorn

        from controller.api import create_app

        app = create_app(self.home, token=self.token, allow_remote=self.token is not None)
        sock = _listen(self.bind, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,  # the CLI's logging; no handlers of uvicorn's own
            access_log=self.access_log,
            proxy_headers=False,  # controller.api judges forwarding headers itself
            server_header=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            ssl_certfile=self.tls_cert,
            ssl_keyfile=self.tls_key,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="gf-api", daemon=True
        )
        self._thread.start()
        stopped = threading.Event()
        waited = 0.0
        while not server.started and self._thread.is_alive() and waited < START_TIMEOUT_S:
            stopped.wait(0.02)
            waited += 0.02
        if not server.started:
            server.should_exit = True
            sock.close()
            raise InvalidRequest(f"the API did not start on {self.url}; see the log above")
        if self.token is not None and not self.tls_cert and not _loopback(self.bind):
            log.warning(
                "the API on %s is plain HTTP: its token crosses the network in clear text; "
                "pass --tls-cert/--tls-key or put it behind a TLS proxy",
                self.url,
            )
        log.info("API, dashboard and /metrics on %s/", self.url)
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def cmd_api_run(args: argparse.Namespace) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InvalidRequest("HTTPS needs both --tls-cert and --tls-key")
    token = access(args.bind, args.token_file)
    server = ApiServer(
        args.home,
        args.bind,
        args.port,
        token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        access_log=args.access_log,
    ).start()
    print(
        f"greenfleet API on {server.url}/ (dashboard /, API /api/v1, schema /openapi.json, "
        f"metrics /metrics){'; remote clients need the token' if token else ''}. "
        "Ctrl-C stops it",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if not server.alive():
            return 3
    server.stop()
    return 0


def cmd_api_token(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.exists() and not args.force:
        raise InvalidRequest(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    os.chmod(path, 0o600)
    print(f"wrote a new API token to {path} (mode 0600); serve with --token-file {path}")
    return 0


def from_args(args: argparse.Namespace) -> ApiServer | None:
    """The in-process API of ``controller run --api`` (None without ``--api``); the token is
    checked here, before the daemon starts."""
    if not getattr(args, "api", False):
        return None
    token = access(args.api_bind, args.api_token_file, "--api-token-file")
    return ApiServer(args.home, args.api_bind, args.api_port, token)


def add_controller_options(run: argparse.ArgumentParser) -> None:
    """``controller run --api [--api-bind HOST] [--api-port N] [--api-token-file F]``."""
    run.add_argument(
        "--api",
        action="store_true",
        help="also serve the read-only HTTP API, dashboard and /metrics (see `api run`)",
    )
    run.add_argument("--api-bind", default="127.0.0.1", help="API address (127.0.0.1)")
    run.add_argument("--api-port", type=int, default=DEFAULT_PORT, help="API port (8080)")
    run.add_argument(
        "--api-token-file",
        help=f"bearer token for remote API clients (or env {TOKEN_ENV}); "
        "required when --api-bind is not loopback",
    )


def register(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    api = sub.add_parser(
        "api", help="the read-only HTTP API, dashboard and Prometheus metrics"
    ).add_subparsers(dest="sub", required=True)
    run = add(
        api,
        "run",
        cmd_api_run,
        "serve the HTTP API (/api/v1), the dashboard (/) and /metrics; read-only",
    )
    run.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; any other needs a token)",
    )
    run.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 8080)")
    run.add_argument(
        "--token-file",
        help=f"file holding the bearer token remote clients must send (or env {TOKEN_ENV})",
    )
    run.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    run.add_argument("--tls-key", help="the certificate's private key (PEM)")
    run.add_argument("--access-log", action="store_true", help="log every request")
    token = add(api, "token", cmd_api_token, "write a new random API token to a file (0600)")
    token.add_argument("file")
    token.add_argument("--force", action="store_true", help="replace an existing file")
