"""The soak: greeter in its production shape under mixed traffic for a long while (scripts/soak).

Starts the built binary with TLS, static tokens and JWTs, quotas, connection.max_age, the probe
port, metrics, and the access log written to a file; drives every kind of call over gRPC
(grpcio), Connect and grpc-web (HTTP/1.1 over TLS), including refusals, expiring deadlines,
cancelled streams and connection churn; sends SIGHUP every 30 s after rewriting the certificate,
tokens and JWKS files; and samples RSS, open descriptors, open connections and calls in flight
every 10 s. Loopback only, bounded by --minutes, stops by itself.

Passes when: RSS after the warm-up grows less than 2% to the end, descriptors and connections
return to their idle values once the load stops, and every call ended with a status its kind
should get. Writes samples.csv, soak.png and summary.json into --out.
"""

import argparse
import base64
import collections
import csv
import http.client
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ISS = "https://soak.example"
SAY_HELLO = "/helloworld.Greeter/SayHello"
STREAM = "/helloworld.Greeter/SayHelloStreamReply"
BIDI = "/helloworld.Greeter/SayHelloBidiStream"
HEALTH = "/grpc.health.v1.Health/Check"


def hello(name):
    raw = name.encode()
    out, n = bytearray([0x0A]), len(raw)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out + raw)


def identity(b):
    return b


class Outcomes:
    """Counts of (kind, outcome); an outcome the kind should not get is a failure."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.unexpected = collections.Counter()
        self.total = 0

    def record(self, kind, outcome, expected):
        with self.lock:
            self.counts[(kind, outcome)] += 1
            self.total += 1
            if outcome not in expected:
                self.unexpected[(kind, outcome)] += 1


def code_of(call):
    try:
        call()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


class Soak:
    def __init__(self, args):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="greeter-soak-")
        self.outcomes = Outcomes()
        self.stop = threading.Event()
        self.samples = []

    # ---- material and server ------------------------------------------------------------
    def material(self):
        d = self.dir
        subprocess.run([self.args.binary, "certs", "generate", "--out", d], check=True,
                       stdout=subprocess.DEVNULL)
        self.tokens = {}
        entries = []
        for name, scopes in [("soak", ["greeter"]), ("limited", ["greeter"]), ("other", ["other"])]:
            out = subprocess.run([self.args.binary, "token", "new", "--name", name,
                                  *sum((["--scope", s] for s in scopes), [])],
                                 check=True, capture_output=True, text=True).stdout
            token = next(l.split()[-1] for l in out.splitlines() if l.startswith("grt_") or " grt_" in l)
            self.tokens[name] = token
            entries.append(out[out.index("[[tokens]]"):])
        self.tokens_text = "\n".join(entries)
        self.key = Ed25519PrivateKey.generate()
        x = self.key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
        self.jwks_text = json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "soak",
                                               "alg": "EdDSA",
                                               "x": base64.urlsafe_b64encode(x).rstrip(b"=").decode()}]})
        self.rewrite_material()
        with open(os.path.join(d, "ca.pem"), "rb") as f:
            self.ca = f.read()
        self.log = os.path.join(d, "access.log")
        config = f"""
[server]
listen = "127.0.0.1:{self.args.port}"
[tls]
enabled = true
cert = "{d}/server.pem"
key = "{d}/server.key"
[auth]
enabled = true
tokens_file = "{d}/tokens.toml"
[[auth.jwt.issuers]]
issuer = "{ISS}"
jwks_file = "{d}/jwks.json"
audiences = ["greeter"]
[[auth.jwt.rules]]
claim = "sub"
pattern = "system:serviceaccount:soak:*"
scopes = ["greeter"]
[auth.policy]
"/grpc.health.v1.Health/*" = "open"
"/helloworld.Greeter/*" = "greeter"
[probe]
listen = "127.0.0.1:{self.args.port + 1}"
[metrics]
listen = "127.0.0.1:{self.args.port + 2}"
[connection]
max_age = "20s"
max_age_grace = "10s"
[limits]
max_recv_message_bytes = 65536
[greeter]
stream_interval = "100ms"
[log]
filter = "info"
format = "json"
[web]
enabled = true
[connect]
enabled = true
[quota]
enabled = true
rate = 100.0
burst = 200
[quota.identities.limited]
class = "token"
rate = 1.0
burst = 2
"""
        self.config = os.path.join(d, "greeter.toml")
        with open(self.config, "w") as f:
            f.write(config)

    def rewrite_material(self):
        """Writes tokens and JWKS anew (the certificate files are rewritten by copy)."""
        d = self.dir
        for name, text in [("tokens.toml", self.tokens_text), ("jwks.json", self.jwks_text)]:
            with open(os.path.join(d, name + ".new"), "w") as f:
                f.write(text)
            os.replace(os.path.join(d, name + ".new"), os.path.join(d, name))
        for name in ["server.pem", "server.key"]:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                data = f.read()
            with open(path + ".new", "wb") as f:
                f.write(data)
            os.chmod(path + ".new", 0o600)
            os.replace(path + ".new", path)

    def start(self):
        self.log_file = open(self.log, "wb")
        self.server = subprocess.Popen([self.args.binary, "serve", "--config", self.config],
                                       stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                self.metrics()
                return
            except OSError:
                time.sleep(0.2)
        sys.exit("soak: the server did not start")

    def metrics(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.args.port + 2, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        values = collections.defaultdict(float)
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            series, value = line.rsplit(" ", 1)
            name = series.split("{", 1)[0]
            values[name] += float(value)
            values[series] = float(value)
        return values

    # ---- clients ------------------------------------------------------------------------
    def channel(self):
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca)
        return grpc.secure_channel(f"localhost:{self.args.port}", creds)

    def jwt(self):
        now = int(time.time())
        claims = {"iss": ISS, "aud": "greeter", "sub": "system:serviceaccount:soak:driver",
                  "iat": now, "exp": now + 600}
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers={"kid": "soak"})

    def grpc_calls(self, ch):
        """One round of every gRPC kind on channel `ch`."""
        unary = ch.unary_unary(SAY_HELLO, request_serializer=identity, response_deserializer=identity)
        stream = ch.unary_stream(STREAM, request_serializer=identity, response_deserializer=identity)
        bidi = ch.stream_stream(BIDI, request_serializer=identity, response_deserializer=identity)
        bearer = lambda who: (("authorization", f"Bearer {who}"),)
        rec = self.outcomes.record
        tok = self.tokens["soak"]

        rec("grpc unary", code_of(lambda: unary(hello("soak"), metadata=bearer(tok), timeout=10)), {"OK"})
        rec("grpc unary jwt", code_of(lambda: unary(hello("jwt"), metadata=bearer(self.jwt()), timeout=10)), {"OK"})
        rec("grpc no token", code_of(lambda: unary(hello("x"), timeout=10)), {"UNAUTHENTICATED"})
        rec("grpc wrong scope", code_of(lambda: unary(hello("x"), metadata=bearer(self.tokens["other"]), timeout=10)),
            {"PERMISSION_DENIED"})
        rec("grpc over quota", code_of(lambda: unary(hello("q"), metadata=bearer(self.tokens["limited"]), timeout=10)),
            {"OK", "RESOURCE_EXHAUSTED"})
        rec("grpc over size", code_of(lambda: unary(hello("x" * 70000), metadata=bearer(tok), timeout=10)),
            {"RESOURCE_EXHAUSTED"})
        rec("grpc stream", code_of(lambda: list(stream(hello("s"), metadata=bearer(tok), timeout=10))), {"OK"})
        rec("grpc stream deadline", code_of(lambda: list(stream(hello("d"), metadata=bearer(tok), timeout=0.35))),
            {"DEADLINE_EXCEEDED"})

        def cancelled():
            call = stream(hello("c"), metadata=bearer(tok), timeout=10)
            next(call)
            call.cancel()
            list(call)

        rec("grpc stream cancelled", code_of(cancelled), {"CANCELLED"})
        rec("grpc bidi", code_of(lambda: list(bidi(iter([hello("a"), hello("b"), hello("c")]),
                                                    metadata=bearer(tok), timeout=10))), {"OK"})

    def http_call(self, path, body, headers):
        ctx = ssl.create_default_context(cadata=self.ca.decode())
        conn = http.client.HTTPSConnection("localhost", self.args.port, context=ctx, timeout=10)
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def http_calls(self):
        rec = self.outcomes.record
        tok = {"authorization": f"Bearer {self.tokens['soak']}"}
        status, _, data = self.http_call(SAY_HELLO, b'{"name":"connect"}',
                                         {**tok, "content-type": "application/json"})
        rec("connect unary", f"HTTP {status}" + (" greeting" if b"Hello" in data else ""),
            {"HTTP 200 greeting"})
        status, _, _ = self.http_call(SAY_HELLO, b'{"name":"connect"}', {"content-type": "application/json"})
        rec("connect no token", f"HTTP {status}", {"HTTP 401"})
        frame = b"\x00" + len(hello("web")).to_bytes(4, "big") + hello("web")
        status, headers, data = self.http_call(SAY_HELLO, frame,
                                               {**tok, "content-type": "application/grpc-web+proto"})
        grpc_status = dict(headers).get("grpc-status")
        if grpc_status is None and b"grpc-status:" in data:
            grpc_status = data.split(b"grpc-status:")[1].split(b"\r\n")[0].strip().decode()
        rec("grpc-web unary", f"HTTP {status} grpc-status {grpc_status}", {"HTTP 200 grpc-status 0"})

    def probe(self):
        with grpc.insecure_channel(f"127.0.0.1:{self.args.port + 1}") as ch:
            check = ch.unary_unary(HEALTH, request_serializer=identity, response_deserializer=identity)
            self.outcomes.record("probe health", code_of(lambda: check(b"", timeout=5)), {"OK"})

    def worker(self, index):
        rng = random.Random(index)
        while not self.stop.is_set():
            # Connection churn: a fresh channel for every round.
            with self.channel() as ch:
                for _ in range(rng.randint(1, 3)):
                    if self.stop.is_set():
                        break
                    self.grpc_calls(ch)
            if not self.stop.is_set():
                self.http_calls()
                self.probe()
            self.stop.wait(self.args.pause)

    # ---- sampling and reloads -----------------------------------------------------------
    def sample(self, start):
        pid = self.server.pid
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        m = self.metrics()
        handled = m["grpc_server_handled_total"]
        self.samples.append({"t": round(time.time() - start, 1), "rss": rss, "fds": fds,
                             "connections": m["greeter_connections_open"],
                             "in_flight": m["greeter_calls_in_flight"],
                             "handled": handled, "client_calls": self.outcomes.total})

    def run(self):
        self.material()
        self.start()
        time.sleep(2)
        start = time.time()
        self.sample(start)
        idle = dict(self.samples[0])
        workers = [threading.Thread(target=self.worker, args=(i,)) for i in range(self.args.workers)]
        for w in workers:
            w.start()
        load_end = start + self.args.minutes * 60
        next_sample, next_reload, reloads = start + 10, start + 30, 0
        while time.time() < load_end:
            now = time.time()
            if now >= next_reload:
                self.rewrite_material()
                self.server.send_signal(signal.SIGHUP)
                reloads += 1
                next_reload += 30
            if now >= next_sample:
                self.sample(start)
                next_sample += 10
            time.sleep(0.2)
            if self.server.poll() is not None:
                sys.exit(f"soak: the server exited with {self.server.returncode}")
        self.stop.set()
        for w in workers:
            w.join()
        # After the load: connections and descriptors must come back to idle.
        settle_end = time.time() + 60
        while True:
            self.sample(start)
            last = self.samples[-1]
            settled = last["connections"] <= idle["connections"] and last["fds"] <= idle["fds"] \
                and last["in_flight"] == 0
            if settled or time.time() > settle_end:
                break
            time.sleep(5)
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(timeout=60)
        return self.report(idle, reloads, settled)

    def report(self, idle, reloads, settled):
        warm = [s for s in self.samples if s["t"] >= self.args.warmup * 60]
        loaded = [s for s in warm if s["t"] <= self.args.minutes * 60]
        rss_start, rss_end = loaded[0]["rss"], loaded[-1]["rss"]
        growth = (rss_end - rss_start) / rss_start * 100
        rss_max = max(s["rss"] for s in loaded)
        unexpected = {f"{k} -> {o}": n for (k, o), n in self.outcomes.unexpected.items()}
        summary = {
            "minutes": self.args.minutes,
            "warmup_minutes": self.args.warmup,
            "workers": self.args.workers,
            "calls": self.outcomes.total,
            "calls_per_second": round(self.outcomes.total / (self.args.minutes * 60), 1),
            "sighup_reloads": reloads,
            "rss_after_warmup_bytes": rss_start,
            "rss_end_bytes": rss_end,
            "rss_max_after_warmup_bytes": rss_max,
            "rss_growth_percent": round(growth, 2),
            "idle": {k: idle[k] for k in ("rss", "fds", "connections")},
            "after": {k: self.samples[-1][k] for k in ("rss", "fds", "connections", "in_flight")},
            "settled": settled,
            "outcomes": {f"{k} -> {o}": n for (k, o), n in sorted(self.outcomes.counts.items())},
            "unexpected": unexpected,
        }
        summary["pass"] = growth < 2.0 and settled and not unexpected
        os.makedirs(self.args.out, exist_ok=True)
        with open(os.path.join(self.args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(self.args.out, "samples.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.samples[0]))
            writer.writeheader()
            writer.writerows(self.samples)
        self.plot()
        print(json.dumps(summary, indent=2))
        return summary["pass"]

    def plot(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = [s["t"] / 60 for s in self.samples]
        rate = [0.0] + [
            (b["client_calls"] - a["client_calls"]) / max(b["t"] - a["t"], 1e-9)
            for a, b in zip(self.samples, self.samples[1:])
        ]
        fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
        axes[0].plot(t, [s["rss"] / 2**20 for s in self.samples], color="tab:blue")
        axes[0].set_ylabel("RSS (MiB)")
        axes[0].axvline(self.args.warmup, color="grey", linestyle=":", label="end of warm-up")
        axes[0].legend(loc="lower right")
        axes[1].plot(t, [s["fds"] for s in self.samples], label="open descriptors")
        axes[1].plot(t, [s["connections"] for s in self.samples], label="open connections")
        axes[1].plot(t, [s["in_flight"] for s in self.samples], label="calls in flight")
        axes[1].legend(loc="upper right")
        axes[2].plot(t, rate, color="tab:green")
        axes[2].set_ylabel("client calls / s")
        axes[2].set_xlabel("minutes")
        for ax in axes:
            ax.axvline(self.args.minutes, color="red", linestyle="--")
        fig.suptitle(f"greeter soak: {self.args.minutes} min of mixed traffic, SIGHUP every 30 s")
        fig.tight_layout()
        fig.savefig(os.path.join(self.args.out, "soak.png"), dpi=80)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", required=True)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--warmup", type=float, default=5, help="minutes before RSS growth is measured")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--pause", type=float, default=0.05, help="seconds each worker rests per round")
    p.add_argument("--port", type=int, default=57051, help="main port; probe and metrics use the next two")
    p.add_argument("--out", default="soak-out")
    args = p.parse_args()
    sys.exit(0 if Soak(args).run() else 1)


if __name__ == "__main__":
    main()
