"""Real storage services for the integration tests, each on a free loopback port.

``redis-server`` (the Debian package) and moto's S3 server run as child processes, so a test can
kill one (SIGKILL), pause it (SIGSTOP: the kernel still accepts connections, nothing answers, which
is what a hung server looks like) and start it again on the same port. When a service cannot be
started the tests that need it are skipped, except under ``CI=true``, where they fail: CI installs
the services (``scripts/install-services.sh``), so a missing one is a broken CI, not a reason to skip.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT_S = 30.0
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

__all__ = [
    "AWS_TEST_ENV",
    "MotoServer",
    "RedisServer",
    "SentinelServer",
    "ServerProcess",
    "aws_env",
    "free_port",
    "moto_server",
    "moto_server_factory",
    "redis_cluster",
    "redis_server",
    "redis_server_factory",
    "redis_url",
    "s3_url",
    "sentinel_factory",
    "service_unavailable",
    "session_servers",
]


def free_port(*, with_bus_port: bool = False) -> int:
    """A free loopback port. ``with_bus_port``: also ``port + 10000`` is free, and the port is at
    most 55535 (what a Redis Cluster node needs for its bus)."""
    if not with_bus_port:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]
    for _ in range(1000):
        port = random.randint(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def service_unavailable(reason: str) -> None:
    """Skip, or fail under CI=true."""
    if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(f"{reason} (CI=true: integration services must be available)", pytrace=False)
    pytest.skip(reason)


class ServerProcess:
    """A server child process on a fixed loopback port that can be killed, paused and restarted."""

    name = "server"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}-{self.port}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                env=self.environment(), start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.ready():
                return
            time.sleep(0.05)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{self.name} did not start on 127.0.0.1:{self.port}:\n{tail}")

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def kill(self) -> None:
        """SIGKILL: the server dies with its data (nothing is persisted)."""
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        self.kill()
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()


def _redis_binary() -> str | None:
    return os.environ.get("LMCACHE_TEST_REDIS_SERVER") or shutil.which("redis-server")


class RedisServer(ServerProcess):
    """redis-server without persistence: a killed server comes back empty, like a cache that lost
    its memory. ``extra_args`` are more redis-server options; ``tls`` = (cert, key) serves TLS only."""

    name = "redis"

    def __init__(
        self, workdir: Path, *extra_args: str, tls: tuple[Path, Path] | None = None, port: int | None = None
    ) -> None:
        super().__init__(workdir, port)
        self.extra_args = extra_args
        self.tls = tls

    def command(self) -> list[str]:
        binary = _redis_binary()
        assert binary is not None
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            cert, key = self.tls
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                      "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
        return [binary, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), *self.extra_args]

    def ready(self) -> bool:
        try:
            return self.call("PING").startswith(b"+PONG")
        except OSError:
            return False

    def call(self, *words: str) -> bytes:
        """Send one command (inline protocol) and return the first bytes of the reply."""
        request = " ".join(words).encode() + b"\r\n"
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as plain:
            if self.tls is None:
                plain.sendall(request)
                return plain.recv(65536)
            context = ssl.create_default_context(cafile=str(self.tls[0]))
            with context.wrap_socket(plain, server_hostname="127.0.0.1") as secure:
                secure.sendall(request)
                return secure.recv(65536)

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"


class SentinelServer(ServerProcess):
    """A redis-server in sentinel mode that monitors ``master`` as ``mymaster``."""

    name = "sentinel"

    def __init__(self, workdir: Path, master: RedisServer) -> None:
        super().__init__(workdir)
        self.master = master

    def command(self) -> list[str]:
        config = self.workdir / f"sentinel-{self.port}.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 1\n"
        )
        binary = _redis_binary()
        assert binary is not None
        return [binary, str(config), "--sentinel"]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
                connection.sendall(b"SENTINEL get-master-addr-by-name mymaster\r\n")
                return str(self.master.port).encode() in connection.recv(1024)
        except OSError:
            return False


class MotoServer(ServerProcess):
    """moto in server mode: a real HTTP S3 API (in memory: a restart loses the buckets)."""

    name = "moto"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **AWS_TEST_ENV}

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=0.5) as response:
                return response.status == 200
        except OSError:
            return False

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_bucket(self, bucket: str) -> None:
        request = urllib.request.Request(f"{self.endpoint_url}/{bucket}", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


class _Servers:
    """Starts servers of one kind and stops them all at teardown."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.started: list[ServerProcess] = []

    def start(self, kind: type[ServerProcess], *args: Any, **kwargs: Any) -> Any:
        if kind is not MotoServer and not _redis_binary():
            service_unavailable("redis-server is not installed (apt-get install redis-server)")
        for attempt in range(3):  # a free port can be taken by someone else before the server binds it
            server = kind(self.tmp_path_factory.mktemp(kind.name), *args, **kwargs)
            try:
                server.start()
            except (OSError, RuntimeError) as error:
                if attempt == 2 or "port" in kwargs:
                    service_unavailable(f"cannot start {kind.name}: {error}")
                continue
            self.started.append(server)
            return server
        raise AssertionError("unreachable")

    def stop_all(self) -> None:
        for server in reversed(self.started):
            server.stop()


@pytest.fixture(scope="session")
def session_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Servers]:
    """Servers shared by the whole session (stopped at its end)."""
    servers = _Servers(tmp_path_factory)
    yield servers
    servers.stop_all()


@pytest.fixture
def redis_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """``start(*redis_server_options, tls=None)``: a private redis-server for tests that kill,
    pause or reconfigure it; stopped after the test."""
    servers = _Servers(tmp_path_factory)
    yield lambda *args, **kwargs: servers.start(RedisServer, *args, **kwargs)
    servers.stop_all()


@pytest.fixture
def sentinel_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[RedisServer], SentinelServer]]:
    """``start(master)``: a sentinel monitoring ``master`` as ``mymaster``."""
    servers = _Servers(tmp_path_factory)
    yield lambda master: servers.start(SentinelServer, master)
    servers.stop_all()


@pytest.fixture(scope="session")
def redis_server(session_servers: _Servers) -> RedisServer:
    """One redis-server shared by the tests that leave it running."""
    return session_servers.start(RedisServer)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL, its data flushed before the test."""
    assert redis_server.call("FLUSHALL").startswith(b"+OK")
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(session_servers: _Servers) -> list[RedisServer]:
    """A three-master Redis Cluster (no replicas), created with ``redis-cli --cluster create``."""
    return start_redis_cluster(session_servers, node_timeout_ms=2000)


def start_redis_cluster(servers: _Servers, node_timeout_ms: int) -> list[RedisServer]:
    """Three masters (no replicas) joined with ``redis-cli --cluster create``, once they agree."""
    nodes = [
        servers.start(RedisServer, "--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms),
                      port=free_port(with_bus_port=True))
        for _ in range(3)
    ]
    cli = shutil.which("redis-cli", path=str(Path(_redis_binary() or "redis-server").parent)) or shutil.which(
        "redis-cli")
    if cli is None:
        service_unavailable("redis-cli is not installed (it comes with redis-server / redis-tools)")
    subprocess.run(
        [cli, "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in nodes), "--cluster-yes"],
        check=True, capture_output=True, timeout=60,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(b"cluster_state:ok" in node.call("CLUSTER", "INFO") for node in nodes):
        if time.monotonic() > deadline:
            service_unavailable("the redis cluster did not reach cluster_state:ok")
        time.sleep(0.1)
    return nodes


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Test credentials through the standard AWS variables, and nothing from the host's AWS setup."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    return dict(AWS_TEST_ENV)


@pytest.fixture
def moto_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], MotoServer]]:
    """``start()``: a private moto S3 server for tests that kill or pause it; stopped after the test."""
    servers = _Servers(tmp_path_factory)
    yield lambda: servers.start(MotoServer)
    servers.stop_all()


@pytest.fixture(scope="session")
def moto_server(session_servers: _Servers) -> MotoServer:
    """One moto S3 server shared by the tests that leave it running."""
    return session_servers.start(MotoServer)


@pytest.fixture
def s3_url(moto_server: MotoServer, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<new bucket>/cache`` on the shared moto server, reached through the standard
    AWS_ENDPOINT_URL variable (as an operator pointing at MinIO would)."""
    bucket = f"lmcache-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint_url)
    return f"s3://{bucket}/cache"


# --- fault injection for the fault matrix (tests/integration/test_faults_remote.py) ---------------

__all__ += ["FaultyHttpProxy", "PasswordRedisServer", "password_redis_factory", "private_redis_cluster",
            "s3_fault_proxy"]


class PasswordRedisServer(RedisServer):
    """redis-server with ``requirepass``; :meth:`call` authenticates first. ``url`` carries the
    password, the form most likely to leak into a log line."""

    def __init__(self, workdir: Path, password: str, *extra_args: str, port: int | None = None) -> None:
        super().__init__(workdir, "--requirepass", password, *extra_args, port=port)
        self.password = password

    def call(self, *words: str) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
            connection.sendall(f"AUTH {self.password}\r\n".encode())
            answer = connection.recv(1024)
            if not answer.startswith(b"+OK"):
                return answer
            connection.sendall(" ".join(words).encode() + b"\r\n")
            return connection.recv(65536)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"


@pytest.fixture
def password_redis_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., PasswordRedisServer]]:
    """``start(password, *redis_server_options)``: a private password-protected redis-server."""
    servers = _Servers(tmp_path_factory)
    yield lambda *args, **kwargs: servers.start(PasswordRedisServer, *args, **kwargs)
    servers.stop_all()


class FaultyHttpProxy:
    """A loopback HTTP proxy in front of an HTTP service (moto's S3 server) that injects the faults
    a healthy server cannot produce. Set the attributes while a test runs:

    - ``status``: answer every request with this HTTP status (500, 503 ...) and an S3 error body;
    - ``delay_s``: wait this long before answering;
    - ``damage_body``: ``"truncate"`` (send half the body the headers announce, then close) or
      ``"garbage"`` (the body reversed, same length) for GETs that succeed upstream.
    """

    def __init__(self, upstream_port: int) -> None:
        import http.server
        import socketserver
        import threading

        self.upstream_port = upstream_port
        self.status: int | None = None
        self.delay_s = 0.0
        self.damage_body: str | None = None
        self.requests = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle_request(self) -> None:
                proxy.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                time.sleep(proxy.delay_s)
                if proxy.status is not None:
                    self.answer(proxy.status, {"Content-Type": "application/xml"}, _s3_error(proxy.status))
                    return
                status, headers, data = proxy.forward(self.command, self.path, dict(self.headers), body)
                damage = proxy.damage_body if self.command == "GET" and status == 200 else None
                if damage == "garbage":
                    data = data[::-1]
                self.answer(status, headers, data, truncate=damage == "truncate")

            def answer(self, status: int, headers: dict[str, str], data: bytes, truncate: bool = False) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data[: len(data) // 2] if truncate else data)
                self.close_connection = truncate

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = handle_request

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out closed its end: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="faulty-http-proxy", daemon=True).start()

    def forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        import http.client

        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            sent = {name: value for name, value in headers.items() if name.lower() != "connection"}
            upstream.request(method, path, body=body, headers=sent)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        hop_by_hop = {"connection", "transfer-encoding", "content-length", "server", "date", "keep-alive"}
        return response.status, {k: v for k, v in response.getheaders() if k.lower() not in hop_by_hop}, data

    def heal(self) -> None:
        self.status, self.delay_s, self.damage_body = None, 0.0, None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.heal()
        self.server.shutdown()
        self.server.server_close()


def _s3_error(status: int) -> bytes:
    code = {500: "InternalError", 503: "SlowDown"}.get(status, "ServiceUnavailable")
    return f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>".encode()


@pytest.fixture
def s3_fault_proxy(moto_server: MotoServer, aws_env: dict[str, str]) -> Iterator[tuple[FaultyHttpProxy, str]]:
    """A :class:`FaultyHttpProxy` in front of the shared moto server, and a new bucket behind it."""
    bucket = f"lmcache-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(bucket)
    proxy = FaultyHttpProxy(moto_server.port)
    yield proxy, bucket
    proxy.close()


@pytest.fixture
def private_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """A three-master Redis Cluster of this test's own, for tests that pause a node (the shared
    ``redis_cluster`` must stay up). A long node timeout keeps a short pause from failing it."""
    servers = _Servers(tmp_path_factory)
    yield start_redis_cluster(servers, node_timeout_ms=60000)
    servers.stop_all()
