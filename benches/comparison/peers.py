"""The servers compared: what each one runs (Peer), greeter's two configuration layers over
config/production.toml, and the lifecycle of a run (start pinned to the server core, wait until it
answers, measure, stop). prepare_peers turns the built binaries into the list of peers.
"""

import os
import signal
import socket
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import ROOT, VENV_PY, host, sink
from .build import build_go_server, build_python_server, grpc_go_version
from .host import free_port, log, pinned, run

# What production.toml enables, kept; only what a loopback benchmark cannot use is changed.
# What both greeter peers change for the benchmark itself: room for 10,000 idle connections from
# one address that start no call, and no shutdown delay (the benchmark restarts servers).
BENCH_OVERRIDES = """\
[limits]
max_connections = 50000
max_connections_per_peer = 0
[connection]
first_call_timeout = "1h"
[shutdown]
delay = "0s"
grace = "2s"
# production.toml's quota (100 calls/s per caller) would measure the quota, not the server: kept
# on, so every call pays its check, but too large for a benchmark to empty (a bucket spanning 1s:
# shorter spans refuse calls whose thread was descheduled, src/call/quota/mod.rs).
[quota]
rate = 1000000.0
burst = 1000000
"""

PLAIN_OVERRIDES = """\
# benches/compare: layered after config/production.toml. Plaintext and no auth (the "production
# stack, plaintext" peer); loopback addresses; everything else as production has it (JSON logs at
# info, probe listener, connection age, limits, deadlines), except: more connections allowed for
# the 10,000-idle-connection measurement (all from one address, none starting a call), and no
# shutdown delay (the benchmark restarts servers).
[server]
listen = "127.0.0.1:{port}"
[tls]
enabled = false
[auth]
enabled = false
[probe]
listen = "127.0.0.1:{probe}"
"""

TLS_OVERRIDES = """\
# benches/compare: layered after config/production.toml: TLS with dev certificates and bearer
# tokens (as production), loopback addresses, more connections, no shutdown delay.
[server]
listen = "127.0.0.1:{port}"
[tls]
enabled = true
cert = "{certs}/server.pem"
key = "{certs}/server.key"
[auth]
enabled = true
tokens_file = "{tokens}"
[probe]
listen = "127.0.0.1:{probe}"
"""

JWT_OVERRIDES = """\
# The greeter-jwt peer: as greeter-tls, the bearer a Kubernetes projected service-account token
# (RS256, as the API server signs by default) verified against a JWKS; every call reuses it, as a
# workload does, so the verified-token cache answers after the first call.
[[auth.jwt.issuers]]
issuer = "https://kubernetes.default.svc.cluster.local"
jwks_file = "{jwks}"
audiences = ["greeter"]
[[auth.jwt.rules]]
claim = "sub"
pattern = "system:serviceaccount:bench:*"
scopes = ["greeter"]
"""


def mint_service_account_token(work):
    """An RS256 token shaped like a projected service-account token, minted by PyJWT, valid for a
    day, and the JWKS that verifies it (written into `work`). Returns (token, jwks path)."""
    import json
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "bench", "alg": "RS256", "use": "sig"}
    jwks = work / "jwks.json"
    jwks.write_text(json.dumps({"keys": [public]}))
    now = int(time.time())
    claims = {"iss": "https://kubernetes.default.svc.cluster.local", "aud": ["greeter"],
              "sub": "system:serviceaccount:bench:client", "iat": now, "nbf": now, "exp": now + 86400,
              "kubernetes.io": {"namespace": "bench", "serviceaccount": {"name": "client"}}}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "bench"}), jwks


# ---------------------------------------------------------------------------------------------
# A peer and its lifecycle


@dataclass
class Peer:
    key: str
    label: str
    argv: list
    port: int
    bench_args: list = field(default_factory=list)
    ready: str = "hello"  # "health": grpc.health.v1 Check SERVING; "hello": an OK SayHello
    tls_ca: str = None
    token: str = None
    binary: Path = None
    bidi64: bool = True
    env: dict = None
    json: bool = False  # also measured with Connect JSON unary calls (h2load)


class Running:
    def __init__(self, peer, startup_ms, proc):
        self.peer, self.startup_ms, self.proc = peer, startup_ms, proc

    @property
    def pid(self):
        return self.proc.pid


def grpc_ready(peer):
    """One readiness probe with grpcio: True once the server answers as ready."""
    import grpc
    target = f"127.0.0.1:{peer.port}"
    if peer.tls_ca:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(peer.tls_ca).read_bytes())
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
    try:
        if peer.ready == "health":
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        import helloworld_pb2
        import helloworld_pb2_grpc
        helloworld_pb2_grpc.GreeterStub(channel).SayHello(
            helloworld_pb2.HelloRequest(name="ready"), timeout=1)
        return True
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def start(peer, timeout=30.0):
    """Starts `peer` pinned to the server core; returns once it is ready, timing start to ready."""
    t0 = time.monotonic()
    proc = subprocess.Popen(peer.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=pinned(host.SERVER_CPU),
                            env=peer.env, start_new_session=True)
    deadline = t0 + timeout
    # First the listening socket (cheap to poll tightly), then the gRPC answer.
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{peer.key} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", peer.port), timeout=0.05).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                stop(Running(peer, 0, proc))
                raise RuntimeError(f"{peer.key} did not listen within {timeout}s")
            time.sleep(0.0005)
    while not grpc_ready(peer):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(Running(peer, 0, proc))
            raise RuntimeError(f"{peer.key} did not become ready within {timeout}s")
        time.sleep(0.0005)
    return Running(peer, (time.monotonic() - t0) * 1000, proc)


def serving(peer, r, what, measure):
    """Starts `peer`, runs `measure(running)`, stops it. A server that fails to start is recorded
    in `r` and skipped, not fatal to the whole run."""
    try:
        running = start(peer)
    except RuntimeError as e:
        log(f"{what}: {e}")
        r.setdefault("start_failures", []).append(f"{what}: {e}")
        return None
    try:
        return measure(running)
    finally:
        stop(running)


def stop(running):
    proc = running.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# Preparing the peers


def loopback_listeners(greeter_bin, production):
    """Every other `listen` key production sets (a metrics port, say) moved to a free loopback
    port, so that the benchmark binds nothing beyond loopback and two servers never collide."""
    shown = subprocess.run([str(greeter_bin), "config", "show", "--config", str(production)],
                           capture_output=True, text=True)
    try:
        merged = tomllib.loads(shown.stdout)
    except tomllib.TOMLDecodeError:
        merged = {}
    sections = [name for name, table in merged.items() if name not in ("server", "probe")
                and isinstance(table, dict) and isinstance(table.get("listen"), str) and table["listen"]]

    def overrides():
        return "".join(f'[{name}]\nlisten = "127.0.0.1:{free_port()}"\n' for name in sections)
    return overrides


def prepare_peers(args, work, greeter_bin, bare_bin):
    peers = []
    p = free_port()
    peers.append(Peer("bare", "bare tonic", [str(bare_bin), f"127.0.0.1:{p}"], p, binary=bare_bin))

    production = ROOT / "config" / "production.toml"
    extra = loopback_listeners(greeter_bin, production)

    def plaintext(key, label, layer="", **kwargs):
        """A greeter peer on production.toml, plaintext, with `layer` (TOML) over it."""
        p, probe = free_port(), free_port()
        config = work / f"{key}.toml"
        config.write_text(PLAIN_OVERRIDES.format(port=p, probe=probe) + BENCH_OVERRIDES + layer + extra())
        peers.append(Peer(key, label,
                          [str(greeter_bin), "serve", "--config", str(production), "--config", str(config)],
                          p, ready="health", binary=greeter_bin, **kwargs))

    plaintext("greeter", "greeter (prod stack, plaintext)")
    # The access log filtered out: what the log costs on one core, which is what a pod with
    # `cpu: 1` gets (the writer thread shares it with the runtime).
    plaintext("greeter-nolog", "greeter (plaintext, access log off)", '[log]\nfilter = "warn"\n')
    # With [connect]: what a JSON unary call costs against a gRPC one on the same server, and what
    # serving Connect (and so HTTP/1.1 detection) costs gRPC calls.
    plaintext("greeter-connect", "greeter (plaintext, + Connect)", "[connect]\nenabled = true\n", json=True)

    certs = work / "certs"
    run([str(greeter_bin), "certs", "generate", "--out", str(certs)], stdout=subprocess.DEVNULL)
    tokens = work / "tokens.toml"
    token = run([str(greeter_bin), "token", "new", "--name", "bench", "--scope", "greeter",
                 "--append", str(tokens)], capture_output=True, text=True).stdout.strip()
    p, probe = free_port(), free_port()
    tls = work / "tls.toml"
    tls.write_text(
        TLS_OVERRIDES.format(port=p, probe=probe, certs=certs, tokens=tokens) + BENCH_OVERRIDES + extra()
    )
    ca = str(certs / "ca.pem")
    peers.append(Peer("greeter-tls", "greeter (prod stack, TLS + token)",
                      [str(greeter_bin), "serve", "--config", str(production), "--config", str(tls)],
                      p, ready="health", tls_ca=ca, token=token, binary=greeter_bin,
                      bench_args=["--tls", "--ca", ca, "--server-name", "localhost", "--token", token]))

    token, jwks = mint_service_account_token(work)
    p, probe = free_port(), free_port()
    jwt_layer = work / "jwt.toml"
    jwt_layer.write_text(
        TLS_OVERRIDES.format(port=p, probe=probe, certs=certs, tokens=tokens) + BENCH_OVERRIDES + extra()
        + JWT_OVERRIDES.format(jwks=jwks)
    )
    peers.append(Peer("greeter-jwt", "greeter (prod stack, TLS + JWT)",
                      [str(greeter_bin), "serve", "--config", str(production), "--config", str(jwt_layer)],
                      p, ready="health", tls_ca=ca, token=token, binary=greeter_bin,
                      bench_args=["--tls", "--ca", ca, "--server-name", "localhost", "--token", token]))

    if "tracing" not in args.skip:
        # The plaintext peer again, with [tracing] on, exporting over OTLP/gRPC to a local sink
        # (sink.py): the cost of a span per call, sampled at 1% and at 100%.
        endpoint = f"http://127.0.0.1:{sink.start()}"
        for ratio, key in ((0.01, "greeter-trace-0.01"), (1.0, "greeter-trace-1")):
            plaintext(key, f"greeter (prod stack, plaintext), traces at {ratio:g}",
                      f'[tracing]\nenabled = true\nendpoint = "{endpoint}"\nsample_ratio = {ratio}\n')

    if "python" not in args.skip:
        server = build_python_server(work)
        p = free_port()
        env = dict(os.environ, PYTHONPATH=str(server.parent))
        peers.append(Peer("python", "Python grpcio quick start", [str(VENV_PY), str(server), f"127.0.0.1:{p}"],
                          p, bidi64=False, env=env))
    else:
        build_python_server(work)

    go_note = None
    if "go" not in args.skip:
        binary, go_note = build_go_server()
        if binary:
            p = free_port()
            peers.append(Peer("go", f"grpc-go {grpc_go_version()} helloworld", [str(binary), f"127.0.0.1:{p}"],
                              p, binary=binary))
        else:
            log(f"grpc-go peer skipped: {go_note}")
    return peers, go_note
