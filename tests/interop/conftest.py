"""Fixtures for the greeter interop suite.

* Python stubs are generated at start-up with grpc_tools.protoc from proto/helloworld.proto
  (and tests/interop/protos/reflection_v1.proto) into a temporary directory put on sys.path.
* One greeter server per session: `$GREETER_BIN serve --listen 127.0.0.1:PORT` on a free
  loopback port (GREETER_BIN defaults to target/debug/greeter, relative paths are taken from
  the repo root), ready once grpc.health.v1 Check("") says SERVING, stopped with SIGTERM.
* grpcurl: $GRPCURL, else .tools/bin/grpcurl (scripts/install-tools), else PATH.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROTO_DIR = ROOT / "proto"
EXTRA_PROTO_DIR = HERE / "protos"

READY_TIMEOUT = 15.0  # seconds for the server to report SERVING
STOP_TIMEOUT = 10.0  # seconds for the server to exit after SIGTERM
RPC_TIMEOUT = 10.0  # deadline of every RPC a test makes
SUBPROCESS_TIMEOUT = 30.0  # bound of every client subprocess (seed client, grpcurl)

_stubs_dir = None
_server_logs = []  # stderr files of servers started by this session, for failure reports


def pytest_configure(config):
    """Generate the Python stubs before test modules are imported."""
    global _stubs_dir
    _stubs_dir = tempfile.mkdtemp(prefix="greeter-interop-stubs-")
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_DIR}", f"-I{EXTRA_PROTO_DIR}",
        f"--python_out={_stubs_dir}", f"--grpc_python_out={_stubs_dir}",
        str(PROTO_DIR / "helloworld.proto"), str(EXTRA_PROTO_DIR / "reflection_v1.proto"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise pytest.UsageError(f"protoc failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    sys.path.insert(0, _stubs_dir)


def pytest_unconfigure(config):
    if _stubs_dir:
        shutil.rmtree(_stubs_dir, ignore_errors=True)


def tail(path, limit=4000):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return text if len(text) <= limit else "...\n" + text[-limit:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for log in _server_logs:
            text = tail(log)
            if text.strip():
                report.sections.append((f"greeter stderr ({log})", text))


def greeter_bin():
    path = Path(os.environ.get("GREETER_BIN", "target/debug/greeter"))
    return path if path.is_absolute() else ROOT / path


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GreeterProcess:
    """A `greeter serve --listen` subprocess, ready (SERVING) once constructed."""

    def __init__(self, workdir):
        exe = greeter_bin()
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            pytest.fail(f"greeter binary not found or not executable: {exe} "
                        "(run `cargo build`, or set GREETER_BIN)", pytrace=False)
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.stderr_path = workdir / "greeter.stderr"
        self.stdout_path = workdir / "greeter.stdout"
        self.argv = [str(exe), "serve", "--listen", self.addr]
        _server_logs.append(self.stderr_path)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # cwd is an empty directory: the server must run on its embedded default config.
            self.proc = subprocess.Popen(self.argv, cwd=workdir, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err)
        try:
            self._wait_serving()
        except BaseException:
            self.stop()
            raise

    def _wait_serving(self):
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer yet"
        with grpc.insecure_channel(self.addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                code = self.proc.poll()
                if code is not None:
                    pytest.fail(f"{' '.join(self.argv)} exited early with code {code}; stderr:\n"
                                f"{tail(self.stderr_path)}", pytrace=False)
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"{' '.join(self.argv)}: health Check(\"\") not SERVING within "
                                f"{READY_TIMEOUT:.0f} s (last: {last}); stderr:\n"
                                f"{tail(self.stderr_path)}", pytrace=False)
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""),
                                      timeout=max(0.05, min(1.0, left)))
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                except grpc.RpcError as e:
                    last = f"{e.code().name}: {e.details()}"
                time.sleep(0.1)

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM, wait up to `timeout` s, then SIGKILL. Returns True if SIGTERM sufficed."""
        if self.proc.poll() is not None:
            return True
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return False


@pytest.fixture(scope="session")
def stubs_dir():
    return _stubs_dir


@pytest.fixture(scope="session")
def greeter(tmp_path_factory):
    """The session's running greeter server (GreeterProcess); use .addr."""
    server = GreeterProcess(tmp_path_factory.mktemp("greeter"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def channel(greeter):
    with grpc.insecure_channel(greeter.addr) as ch:
        yield ch


@pytest.fixture(scope="session")
def greeter_stub(channel):
    import helloworld_pb2_grpc

    return helloworld_pb2_grpc.GreeterStub(channel)


@pytest.fixture(scope="session")
def grpcurl():
    candidates = [os.environ.get("GRPCURL"), str(ROOT / ".tools" / "bin" / "grpcurl"),
                  shutil.which("grpcurl")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    pytest.fail("grpcurl not found: run scripts/install-tools (or set GRPCURL)", pytrace=False)
