"""The load generators: `greeter bench` (tonic's client: every answer counted by gRPC status,
ping-pong bidi, open-loop latency) and h2load (nghttp2, C: enough load to saturate a server core,
its replies checked by DATA bytes and one nghttp probe). Each run samples the server's CPU time.
"""

import json
import re
import shutil
import struct
import subprocess
import time

from . import host
from .host import apt_install, cpu_seconds, pinned

# Bytes of DATA in one reply: the gRPC frame of HelloReply{message: "Hello, bench!"}.
REPLY_BYTES = 20
# The same reply as a Connect unary JSON body: {"message":"Hello, bench!"}.
JSON_REPLY_BYTES = 27
BIDI_BATCH = 100  # requests per h2load bidi stream

# The Debian package the script installs when h2load is missing.
APT_H2LOAD = ["nghttp2-client"]


class Bench:
    def __init__(self, binary):
        self.binary = binary

    def run(self, running, rpc, connections, concurrency, duration, warmup, rate=None):
        peer = running.peer
        argv = [str(self.binary), "bench", "--addr", f"127.0.0.1:{peer.port}", "--rpc", rpc,
                "--connections", str(connections), "--concurrency", str(concurrency),
                "--duration", f"{duration}s", "--warmup", f"{warmup}s", "--json",
                *peer.bench_args]
        if rate:
            argv += ["--rate", f"{rate:.0f}"]
        cpu0, wall0 = cpu_seconds(running.pid), time.monotonic()
        try:
            r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=duration + warmup + 20, preexec_fn=pinned(host.LOAD_CPU))
        except subprocess.TimeoutExpired:
            return {"error": "load generator timed out"}
        cpu1, wall1 = cpu_seconds(running.pid), time.monotonic()
        if r.returncode != 0:
            return {"error": (r.stderr.strip() or r.stdout.strip())[-300:]}
        report = json.loads(r.stdout)
        utilisation = (cpu1 - cpu0) / (wall1 - wall0)
        report["server_cpu_utilisation"] = utilisation
        report["server_cpu_us_per_call"] = (utilisation / report["per_second"] * 1e6
                                           if report["per_second"] else None)
        report["errors"] = report["requests"] - report["ok"]
        return report


# ---------------------------------------------------------------------------------------------
# h2load cross-check


def grpc_frame(name):
    message = b"\x0a" + bytes([len(name)]) + name.encode()
    return b"\x00" + struct.pack(">I", len(message)) + message


class H2Load:
    """h2load runs: a warm-up run, then a measured run with the server's CPU time sampled."""

    def __init__(self, work):
        self.h2load, self.nghttp = shutil.which("h2load"), shutil.which("nghttp")
        self.unary = work / "sayhello.grpc"
        self.unary.write_bytes(grpc_frame("bench"))
        self.bidi = work / "bidi.grpc"
        self.bidi.write_bytes(grpc_frame("bench") * BIDI_BATCH)
        self.json = work / "sayhello.json"
        self.json.write_bytes(json.dumps({"name": "bench"}, separators=(",", ":")).encode())

    def _argv(self, peer, method, body, json_unary=False):
        scheme = "https" if peer.tls_ca else "http"
        argv = ["-d", str(body), "-H", "content-type: application/json"] if json_unary else \
            ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
        if peer.token:
            argv += ["-H", f"authorization: Bearer {peer.token}"]
        return argv + [f"{scheme}://127.0.0.1:{peer.port}/helloworld.Greeter/{method}"]

    def probe(self, peer):
        """grpc-status of the exact requests h2load sends (h2load itself sees HTTP status only)."""
        found = {}
        for method, body in (("SayHello", self.unary), ("SayHelloBidiStream", self.bidi)):
            r = subprocess.run([self.nghttp, "-v", *self._argv(peer, method, body)],
                               capture_output=True, timeout=30)
            statuses = re.findall(rb"grpc-status: (\d+)", r.stdout)
            found[method] = ",".join(x.decode() for x in statuses) or "none"
        return found

    def run(self, running, bidi, connections, streams, duration, warmup, json_unary=False):
        """json_unary: SayHello as a Connect unary call with JSON (HTTP/2, so the same h2load
        settings), its replies checked by their JSON length."""
        peer = running.peer
        method, body, per_call = (("SayHelloBidiStream", self.bidi, BIDI_BATCH) if bidi
                                  else ("SayHello", self.json if json_unary else self.unary, 1))
        reply_bytes = JSON_REPLY_BYTES if json_unary else REPLY_BYTES
        common = [self.h2load, "-t", "1", "-c", str(connections), "-m", str(streams)]
        tail = self._argv(peer, method, body, json_unary)
        # Warm-up as its own run: with --warm-up-time h2load's byte counts include the warm-up.
        subprocess.run([*common, "-D", f"{int(warmup * 1000)}ms", *tail], capture_output=True,
                       timeout=warmup + 60, preexec_fn=pinned(host.LOAD_CPU))
        cpu0, wall0 = cpu_seconds(running.pid), time.monotonic()
        try:
            r = subprocess.run([*common, "-D", f"{int(duration * 1000)}ms", *tail], capture_output=True,
                               text=True, errors="replace", timeout=duration + 60,
                               preexec_fn=pinned(host.LOAD_CPU))
        except subprocess.TimeoutExpired:
            return {"error": "h2load timed out"}
        cpu1, wall1 = cpu_seconds(running.pid), time.monotonic()
        rate = re.search(r"finished in [^,]+, ([\d.]+) req/s", r.stdout)
        done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                         r"(\d+) failed, (\d+) errored", r.stdout)
        data = re.search(r"traffic: .* \((\d+)\) data", r.stdout)
        if not (rate and done and data):
            return {"error": "h2load: " + (r.stdout + r.stderr).strip()[-300:]}
        succeeded, failed = int(done.group(4)), int(done.group(5)) + int(done.group(6))
        replies = int(data.group(1)) / reply_bytes
        utilisation = (cpu1 - cpu0) / (wall1 - wall0)
        per_second = float(rate.group(1)) * per_call
        return {
            "per_second": per_second, "calls": succeeded, "failed": failed,
            # Replies seen over replies expected. Below 1: some calls were answered without a reply
            # message, i.e. with a gRPC error inside an HTTP 200 response.
            "reply_ratio": replies / (succeeded * per_call) if succeeded else None,
            "server_cpu_utilisation": utilisation,
            "server_cpu_us_per_call": utilisation / per_second * 1e6 if per_second else None,
            "errors": failed + max(0, round(succeeded * per_call - replies)),
        }


def ensure_h2load():
    if shutil.which("h2load") and shutil.which("nghttp"):
        return True
    return apt_install(APT_H2LOAD) and bool(shutil.which("h2load"))
