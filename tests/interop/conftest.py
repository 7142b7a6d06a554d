"""Fixtures for the greeter interop suite.

* Python stubs are generated at start-up with grpc_tools.protoc from proto/helloworld.proto
  (and tests/interop/protos/reflection_v1.proto) into a temporary directory put on sys.path.
* One greeter server per session: `$GREETER_BIN serve --listen 127.0.0.1:PORT` on a free
  loopback port (GREETER_BIN defaults to target/debug/greeter, relative paths are taken from
  the repo root), ready once grpc.health.v1 Check("") says SERVING, stopped with SIGTERM.
* grpcurl: $GRPCURL, else .tools/bin/grpcurl (scripts/install-tools), else PATH.
* buf (`buf curl`): $BUF, else .tools/venv/bin/buf (PyPI buf-bin, scripts/install-tools), else PATH.
* Node client: `node` from PATH running tests/interop/node/client.js with the modules that
  scripts/install-tools put in .tools/node/node_modules (`npm ci` of tests/interop/node/).
* One TLS + bearer-token greeter per session (`secure_greeter`): dev certificates from
  `greeter certs generate`, two tokens from `greeter token new --append`, a config file with TLS
  on, mTLS off, auth on and a plaintext probe listener; ready once Check("") on the probe port
  says SERVING. Tests that need other settings (mTLS) start their own with start_secure_greeter.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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


def require_greeter_bin():
    exe = greeter_bin()
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        pytest.fail(f"greeter binary not found or not executable: {exe} "
                    "(run `cargo build`, or set GREETER_BIN)", pytrace=False)
    return exe


_has_metrics = {}


def binary_has_metrics(exe, cwd):
    """Whether this greeter binary's configuration has metrics.listen (asked once per binary)."""
    st = Path(exe).stat()
    key = (str(exe), st.st_mtime_ns, st.st_size)
    if key not in _has_metrics:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GREETER__")}
        shown = greeter_cli("config", "show", cwd=cwd, env=env).stdout
        section = re.search(r"^\[metrics\]\n(.*?)(?=^\[|\Z)", shown, re.M | re.S)
        _has_metrics[key] = bool(section and re.search(r"^listen\s*=", section.group(1), re.M))
    return _has_metrics[key]


class GreeterProcess:
    """A `greeter serve [--config FILE] [EXTRA_ARGS] --listen` subprocess, ready (SERVING) once
    constructed.

    Listens on 127.0.0.1:`port` (default: a free port). Readiness is grpc.health.v1 Check("") over
    plaintext on `health_addr`: the main listener by default; give the probe listener's address
    when the main one speaks TLS. (The server binds both listeners before it serves, and turns
    SERVING only once both serve.) `env`: extra environment variables for the server (e.g.
    GREETER__GREETER__STREAM_INTERVAL), on top of this process's environment.

    When the binary has a metrics listener (`metrics.listen`, on a fixed port by default), it is
    put on a free loopback port of its own (`metrics_addr`), so that servers run side by side;
    give GREETER__METRICS__LISTEN in `env` to choose otherwise.
    """

    def __init__(self, workdir, config=None, extra_args=(), health_addr=None, port=None, env=None):
        exe = require_greeter_bin()
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.health_addr = health_addr or self.addr
        self.stderr_path = workdir / "greeter.stderr"
        self.stdout_path = workdir / "greeter.stdout"
        config_args = ["--config", str(config)] if config is not None else []
        env = dict(env or {})
        self.metrics_addr = None
        if "GREETER__METRICS__LISTEN" not in env and binary_has_metrics(exe, workdir):
            taken = {self.addr, self.health_addr}
            metrics_addr = next(a for a in (f"127.0.0.1:{free_port()}" for _ in range(20))
                                if a not in taken)
            env["GREETER__METRICS__LISTEN"] = metrics_addr
        if env.get("GREETER__METRICS__LISTEN"):
            self.metrics_addr = env["GREETER__METRICS__LISTEN"]
        self.argv = [str(exe), "serve", *config_args, *extra_args, "--listen", self.addr]
        _server_logs.append(self.stderr_path)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # cwd is an empty directory: without --config the server runs on its embedded default.
            self.proc = subprocess.Popen(self.argv, cwd=workdir, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err,
                                         env={**os.environ, **env})
        try:
            self._wait_serving()
        except BaseException:
            self.stop()
            raise

    def _wait_serving(self):
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer yet"
        # Short reconnect backoff: a first attempt made before the server listens must not cost
        # the default 1 s backoff.
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 200), ("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(self.health_addr, options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                code = self.proc.poll()
                if code is not None:
                    pytest.fail(f"{' '.join(self.argv)} exited early with code {code}; stderr:\n"
                                f"{tail(self.stderr_path)}", pytrace=False)
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"{' '.join(self.argv)}: health Check(\"\") on {self.health_addr} "
                                f"not SERVING within "
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


def executable(path):
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


@pytest.fixture(scope="session")
def buf():
    """The buf CLI (for `buf curl`)."""
    for c in [os.environ.get("BUF"), str(ROOT / ".tools" / "venv" / "bin" / "buf"), shutil.which("buf")]:
        if executable(c):
            return c
    pytest.fail("buf not found: run scripts/install-tools (or set BUF)", pytrace=False)


NODE_MODULES = ROOT / ".tools" / "node" / "node_modules"
NODE_CLIENT = HERE / "node" / "client.js"


@pytest.fixture(scope="session")
def node_client():
    """argv prefix and environment that run the Node interop client: `node client.js`, with
    NODE_PATH at the modules scripts/install-tools installed."""
    node = shutil.which("node")
    if not executable(node):
        pytest.fail("node not found on PATH: run scripts/install-tools", pytrace=False)
    for module in ("@grpc/grpc-js", "@grpc/proto-loader"):
        if not (NODE_MODULES / module / "package.json").is_file():
            pytest.fail(f"{module} not in {NODE_MODULES}: run scripts/install-tools", pytrace=False)
    env = {k: v for k, v in os.environ.items() if k not in ("GREETER_TOKEN", "NODE_OPTIONS")}
    env["NODE_PATH"] = str(NODE_MODULES)
    return [node, str(NODE_CLIENT)], env


# ---- TLS, tokens and the secure server ------------------------------------------------------

def greeter_cli(*args, cwd, check=True, env=None):
    """Runs `$GREETER_BIN ARGS` (bounded by SUBPROCESS_TIMEOUT) and returns the CompletedProcess;
    with `check`, fails the test unless it exits 0."""
    argv = [str(require_greeter_bin()), *map(str, args)]
    try:
        res = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{argv} still running after {SUBPROCESS_TIMEOUT:.0f} s:\n{e.stdout}{e.stderr}",
                    pytrace=False)
    if check and res.returncode != 0:
        pytest.fail(f"{argv} exited {res.returncode}:\n{res.stdout}{res.stderr}", pytrace=False)
    return res


def greeter_config_show(cwd, *config_files, env=None):
    """The merged configuration `greeter config show [--config FILE]...` prints, parsed (TOML), as
    a server started the same way (same files, same environment) runs with."""
    import tomllib

    args = [a for f in config_files for a in ("--config", f)]
    out = greeter_cli("config", "show", *args, cwd=cwd, env=env).stdout
    try:
        return tomllib.loads(out)
    except tomllib.TOMLDecodeError as e:
        pytest.fail(f"greeter config show printed no valid TOML ({e}):\n{out}", pytrace=False)


@dataclass(frozen=True)
class Pki:
    """The files of `greeter certs generate --out DIR`."""

    dir: Path

    ca = property(lambda self: self.dir / "ca.pem")
    server_cert = property(lambda self: self.dir / "server.pem")
    server_key = property(lambda self: self.dir / "server.key")
    client_cert = property(lambda self: self.dir / "client.pem")
    client_key = property(lambda self: self.dir / "client.key")

    def read(self, name):
        """Bytes of one of the files: "ca", "server_cert", "client_key", ..."""
        return getattr(self, name).read_bytes()


def make_pki(out, hosts=("localhost", "127.0.0.1")):
    """A dev CA with a server certificate for `hosts` and a client certificate, made by greeter."""
    out = Path(out)
    host_args = [a for h in hosts for a in ("--host", h)]
    greeter_cli("certs", "generate", "--out", out, *host_args, cwd=out.parent)
    pki = Pki(out)
    for name in ("ca", "server_cert", "server_key", "client_cert", "client_key"):
        path = getattr(pki, name)
        if not (path.is_file() and b"-----BEGIN " in path.read_bytes()):
            pytest.fail(f"greeter certs generate did not write a PEM {path}", pytrace=False)
    return pki


def new_token(tokens_file, name, scopes):
    """`greeter token new --append`: appends the entry to tokens_file, returns the token."""
    scope_args = [a for s in scopes for a in ("--scope", s)]
    out = greeter_cli("token", "new", "--name", name, *scope_args, "--append", tokens_file,
                      cwd=Path(tokens_file).parent).stdout
    lines = out.splitlines()
    if len(lines) != 1 or not lines[0].strip() or lines[0] != lines[0].strip():
        pytest.fail(f"greeter token new --append printed {out!r}, expected the token alone on one "
                    "line", pytrace=False)
    return lines[0]


def toml_str(value):
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def secure_config(path, pki, tokens_file, probe_addr, client_auth="none"):
    """Writes a greeter config: TLS with pki's server certificate (client certificates verified
    against pki's CA unless client_auth is "none"), token auth with tokens_file on the default
    policy, and a plaintext probe listener on probe_addr."""
    mtls = "" if client_auth == "none" else (
        f"client_ca = {toml_str(pki.ca)}\nclient_auth = {toml_str(client_auth)}\n")
    Path(path).write_text(
        "[tls]\n"
        "enabled = true\n"
        f"cert = {toml_str(pki.server_cert)}\n"
        f"key = {toml_str(pki.server_key)}\n"
        f"{mtls}"
        "\n[auth]\n"
        "enabled = true\n"
        f"tokens_file = {toml_str(tokens_file)}\n"
        "\n[probe]\n"
        f"listen = {toml_str(probe_addr)}\n")
    return Path(path)


def two_free_ports():
    """Two distinct free loopback ports: the main and the probe listener."""
    first = free_port()
    for _ in range(20):
        second = free_port()
        if second != first:
            return first, second
    pytest.fail("could not find two distinct free loopback ports", pytrace=False)


def tls_channel(target, root_certificates, token=None, private_key=None, certificate_chain=None):
    """A grpcio TLS channel, the root certificates given explicitly (never the default roots),
    with the token as call credentials (authorization: Bearer TOKEN) when one is given, and a
    subchannel pool of its own so that no connection state is shared with other tests."""
    creds = grpc.ssl_channel_credentials(root_certificates=root_certificates,
                                         private_key=private_key,
                                         certificate_chain=certificate_chain)
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, creds, options=[("grpc.use_local_subchannel_pool", 1)])


@dataclass(frozen=True)
class SecureMaterial:
    """What a secure server and its clients share: a dev PKI and a tokens file with two tokens."""

    pki: Pki
    tokens_file: Path
    token: str  # scopes greeter + reflection
    reflection_token: str  # scope reflection only


@pytest.fixture(scope="session")
def secure_material(tmp_path_factory):
    base = tmp_path_factory.mktemp("material")
    pki = make_pki(base / "pki")
    tokens_file = base / "tokens.toml"
    token = new_token(tokens_file, "interop-full", ["greeter", "reflection"])
    reflection_token = new_token(tokens_file, "interop-reflection", ["reflection"])
    return SecureMaterial(pki=pki, tokens_file=tokens_file, token=token,
                          reflection_token=reflection_token)


def start_secure_greeter(workdir, material, client_auth="none"):
    """A TLS + token greeter on material, with a probe listener; returns (GreeterProcess, probe
    address). Ready once Check("") on the probe says SERVING."""
    workdir = Path(workdir)
    port, probe_port = two_free_ports()
    probe_addr = f"127.0.0.1:{probe_port}"
    config = secure_config(workdir / "greeter.toml", material.pki, material.tokens_file, probe_addr,
                           client_auth=client_auth)
    server = GreeterProcess(workdir / "server", config=config, health_addr=probe_addr, port=port)
    return server, probe_addr


@dataclass(frozen=True)
class SecureGreeter:
    server: GreeterProcess
    material: SecureMaterial
    probe_addr: str  # plaintext, health only

    pki = property(lambda self: self.material.pki)
    tokens_file = property(lambda self: self.material.tokens_file)
    token = property(lambda self: self.material.token)
    reflection_token = property(lambda self: self.material.reflection_token)

    @property
    def port(self):
        return self.server.port

    @property
    def target(self):
        """localhost:PORT: a name the server certificate is issued for."""
        return f"localhost:{self.server.port}"


@pytest.fixture(scope="session")
def secure_greeter(secure_material, tmp_path_factory):
    """The session's TLS + token greeter (SecureGreeter), mTLS off, probe listener on."""
    server, probe_addr = start_secure_greeter(tmp_path_factory.mktemp("secure"), secure_material)
    yield SecureGreeter(server=server, material=secure_material, probe_addr=probe_addr)
    server.stop()


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory):
    """A second, unrelated dev PKI (same host names): its CA must not be trusted by anyone."""
    return make_pki(tmp_path_factory.mktemp("other") / "pki")


REFLECTION_SERVICES = {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}

_REQ, _REP = r"\.helloworld\.HelloRequest", r"\.helloworld\.HelloReply"
GREETER_RPC_SIGNATURES = {
    "SayHello": rf"rpc SayHello \( {_REQ} \) returns \( {_REP} \)",
    "SayHelloAgain": rf"rpc SayHelloAgain \( {_REQ} \) returns \( {_REP} \)",
    "SayHelloStreamReply": rf"rpc SayHelloStreamReply \( {_REQ} \) returns \( stream {_REP} \)",
    "SayHelloBidiStream": rf"rpc SayHelloBidiStream \( stream {_REQ} \) returns \( stream {_REP} \)",
}


def missing_greeter_rpcs(describe_output):
    """The Greeter RPCs whose exact signature `grpcurl describe helloworld.Greeter` did not print."""
    return [name for name, pattern in GREETER_RPC_SIGNATURES.items()
            if not re.search(pattern, describe_output)]


def grpcurl_run(grpcurl, cwd, *args):
    """grpcurl ARGS, bounded (-max-time and SUBPROCESS_TIMEOUT); returns the CompletedProcess,
    whatever its exit code."""
    argv = [grpcurl, "-max-time", str(int(RPC_TIMEOUT)), *args]
    try:
        return subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{argv} still running after {SUBPROCESS_TIMEOUT:.0f} s:\n{e.stdout}{e.stderr}",
                    pytrace=False)
