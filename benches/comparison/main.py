"""The command line of benches/compare (DOC below is its --help), the three measurement phases
over the peers (throughput rounds, half-load latency rounds, idle connections), and the output: the
summary printed and every measurement written to <target>/bench-compare/latest.json.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import ROOT, host
from .build import build_rust, cargo_target_dir
from .host import contention, free_port, log, machine, raise_nofile, rss_kib
from .idle import hold_connections, measure_idle_connections
from .load import Bench, H2Load, ensure_h2load
from .peers import Peer, grpc_ready, prepare_peers, serving
from .report import RUN_KINDS, median, ok_runs, summarise, tables, targets

DOC = """Benchmarks greeter against its peers on this machine and prints one table.

Peers, each started fresh per round and pinned to one core (the load generators on the other),
rounds alternated (A B C D E, A B C D E, ...), medians reported with ratios to the baseline (bare
tonic, plaintext):

  bare         examples/bare_tonic.rs: tonic::transport::Server + GreeterServer, nothing else
  greeter      greeter, config/production.toml with TLS and auth off and loopback addresses
  greeter-tls  greeter, config/production.toml with dev certs and a bearer token (TLS + auth)
  greeter-jwt  greeter-tls with a JWT bearer (RS256 service-account token from PyJWT, reused)
  python       gRPC's Python quick start greeter_server.py (grpcio), generated here
  go           grpc-go's helloworld greeter_server, built offline from Debian packages

Two load generators, because on two cores one core of a full gRPC client cannot saturate one core
of a tonic server:
  h2load (nghttp2, C): server-bound throughput. It counts HTTP 200s only, so every run is checked
    for hidden gRPC errors by its DATA bytes (a failed call has no reply message: the byte count
    must equal 20 bytes x replies), and nghttp shows the grpc-status of the same request once.
  greeter bench (tonic client): status-checked throughput (every answer counted by gRPC code),
    bidi ping-pong, and open-loop latency (no coordinated omission).

Measured: unary SayHello throughput and the server's CPU time per call (/proc/PID/stat); bidi
SayHelloBidiStream greetings/s over 1 and 64 streams (h2load: 100 requests per stream, pipelined;
greeter bench: ping-pong); p50/p99 in an open loop at half of each server's saturation rate (capped
at half of what greeter bench can drive); idle RSS; RSS per idle HTTP/2 connection (10,000 of
them); process start to health SERVING (first OK SayHello for peers without health); binary size.
"""


def git_state():
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main():
    parser = argparse.ArgumentParser(description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (< 2 minutes once built)")
    parser.add_argument("--rounds", type=int, help="rounds of each measurement (default 3; --quick 1)")
    parser.add_argument("--duration", type=float, help="seconds measured per unary run (default 3; --quick 1)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per run (default 1; --quick 0.5)")
    parser.add_argument("--connections", type=int, default=4,
                        help="greeter bench unary: HTTP/2 connections (default 4)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="greeter bench unary: concurrent calls per connection (default 16)")
    parser.add_argument("--h2-connections", type=int, default=8, help="h2load unary: connections (default 8)")
    parser.add_argument("--h2-streams", type=int, default=128,
                        help="h2load unary: concurrent streams per connection (default 128)")
    parser.add_argument("--idle-connections", type=int, help="idle connections held (default 10000; --quick 1000)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["python", "go", "tracing", "idle-connections", "half-load", "build"],
                        help="leave out a peer or a measurement (repeatable)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only these peers (bare always runs: it is the baseline)")
    parser.add_argument("--bench-bin", help="use this `greeter` binary as the load generator")
    parser.add_argument("--greeter-bin", help="benchmark this `greeter` binary instead of the one built here")
    parser.add_argument("--wait-idle", type=float, default=0,
                        help="wait up to this many seconds for no rustc to be running before measuring")
    parser.add_argument("--json", help="also write every measurement to this file "
                                       "(default: <target>/bench-compare/latest.json)")
    parser.add_argument("--hold-connections", nargs=2, type=int, metavar=("PORT", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    args = parser.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `benches/compare | head` ends quietly

    if args.hold_connections:
        raise_nofile()
        asyncio.run(hold_connections(args.hold_connections[0], args.hold_connections[1], args.ca))
        return 0

    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    duration = args.duration or (1.0 if quick else 3.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    idle_count = args.idle_connections or (1000 if quick else 10000)
    bidi_duration = duration if quick else max(1.0, duration * 2 / 3)
    bidi_warmup = min(warmup, 0.5)

    if (os.cpu_count() or 1) < 2:
        host.SERVER_CPU = host.LOAD_CPU = None
        log("fewer than 2 CPUs: no pinning; server and load generator share the CPU")

    t_start = time.monotonic()
    greeter_bin, bare_bin = build_rust("build" in args.skip)
    if args.greeter_bin:
        greeter_bin = Path(args.greeter_bin).resolve()
    bench = Bench(Path(args.bench_bin).resolve() if args.bench_bin else greeter_bin)
    if not ensure_h2load():
        log("h2load (Debian nghttp2-client) is required and could not be installed")
        return 1

    if args.wait_idle:
        until = time.monotonic() + args.wait_idle
        while contention()["rustc_processes"] and time.monotonic() < until:
            time.sleep(5)

    work = Path(tempfile.mkdtemp(prefix="greeter-compare-"))
    # Run copies: another build into the shared target directory mid-run cannot swap a binary.
    (work / "bin").mkdir()
    same = bench.binary == greeter_bin
    greeter_bin = Path(shutil.copy2(greeter_bin, work / "bin" / "greeter"))
    bare_bin = Path(shutil.copy2(bare_bin, work / "bin" / "bare_tonic"))
    if same:
        bench.binary = greeter_bin
    h2 = H2Load(work)
    results = {"machine": machine(), "git": git_state(), "contention_before": contention(), "argv": sys.argv,
               "settings": {"rounds": rounds, "duration": duration, "warmup": warmup,
                            "connections": args.connections, "concurrency": args.concurrency,
                            "h2_connections": args.h2_connections, "h2_streams": args.h2_streams,
                            "idle_connections": idle_count, "bidi_duration": bidi_duration,
                            "greeter_bin": str(greeter_bin), "bench_bin": str(bench.binary)},
               "peers": {}}
    try:
        peers, go_note = prepare_peers(args, work, greeter_bin, bare_bin)
        if args.only:
            peers = [p for p in peers if p.key == "bare" or p.key in args.only]
        results["go_note"] = go_note
        for peer in peers:
            results["peers"][peer.key] = {
                "label": peer.label, **{k: [] for k in RUN_KINDS}, "idle_rss_kib": [], "startup_ms": [],
                "binary_bytes": peer.binary.stat().st_size if peer.binary else None,
            }
        # The orchestrator (and the readiness probes) stay off the servers' core; grpcio's one-time
        # set-up is paid here, not in the first peer's start-up time.
        if host.LOAD_CPU is not None:
            os.sched_setaffinity(0, {host.LOAD_CPU})
        grpc_ready(Peer("warm", "", [], free_port()))

        # Phase 1: throughput, start-up time and idle RSS; peers alternate within each round.
        for rnd in range(rounds):
            for peer in peers:
                r = results["peers"][peer.key]
                log(f"round {rnd + 1}/{rounds}: {peer.key}")

                def measure(running, r=r, peer=peer, first=rnd == 0):
                    r["startup_ms"].append(running.startup_ms)
                    time.sleep(0.5)
                    r["idle_rss_kib"].append(rss_kib(running.pid))
                    if first:
                        r["probe"] = h2.probe(peer)
                    r["h2_unary"].append(h2.run(running, False, args.h2_connections, args.h2_streams,
                                                duration, warmup))
                    if peer.json:
                        r["h2_json"].append(h2.run(running, False, args.h2_connections, args.h2_streams,
                                                   duration, warmup, json_unary=True))
                    r["unary"].append(bench.run(running, "unary", args.connections, args.concurrency,
                                                duration, warmup))
                    r["h2_bidi1"].append(h2.run(running, True, 1, 1, bidi_duration, bidi_warmup))
                    r["h2_bidi64"].append(h2.run(running, True, 1, 64, bidi_duration, bidi_warmup))
                    r["bidi1"].append(bench.run(running, "bidi", 1, 1, bidi_duration, bidi_warmup))
                    if peer.bidi64:
                        r["bidi64"].append(bench.run(running, "bidi", 1, 64, bidi_duration, bidi_warmup))
                    r["peak_rss_kib"] = max(r.get("peak_rss_kib", 0), rss_kib(running.pid))

                serving(peer, r, f"round {rnd + 1}", measure)

        # Phase 2: latency in an open loop at half of each server's saturation, as far as the
        # load generator reaches (beyond its own closed-loop rate it would queue, not the server).
        if "half-load" not in args.skip:
            for rnd in range(rounds):
                for peer in peers:
                    r = results["peers"][peer.key]
                    reach = [median([x["per_second"] for x in ok_runs(r[k])]) for k in ("h2_unary", "unary")]
                    reach = [x for x in reach if x]
                    if not reach:
                        continue
                    rate = min(reach) / 2
                    log(f"half load round {rnd + 1}/{rounds}: {peer.key} at {rate:.0f}/s")
                    serving(peer, r, f"half load {rnd + 1}", lambda running, r=r, rate=rate:
                            r["half_load"].append(bench.run(running, "unary", args.connections,
                                                            args.concurrency, duration, warmup, rate=rate)))

        # Phase 3: memory per idle connection.
        if "idle-connections" not in args.skip:
            for peer in peers:
                log(f"{idle_count} idle connections: {peer.key}")
                r = results["peers"][peer.key]
                r["idle_connections"] = serving(peer, r, "idle connections", lambda running, peer=peer:
                                                measure_idle_connections(running, idle_count, peer.tls_ca))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results["contention_after"] = contention()
    results["elapsed_s"] = time.monotonic() - t_start
    rows = summarise(results, peers)
    results["summary"] = rows
    out = Path(args.json) if args.json else cargo_target_dir() / "bench-compare" / "latest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))

    m, g = results["machine"], results["git"]
    c0, c1 = results["contention_before"], results["contention_after"]
    print(f"greeter benches/compare at {g['commit']}{' (uncommitted changes)' if g['dirty'] else ''}: "
          f"{m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, {m['rustc']}")
    print(f"servers pinned to CPU {host.SERVER_CPU}, load generators to CPU {host.LOAD_CPU}; "
          f"{rounds} rounds alternated; {duration:g}s measured (bidi {bidi_duration:g}s) after a warm-up")
    print(f"contention: rustc processes {c0['rustc_processes']} before / {c1['rustc_processes']} after, "
          f"load average {c0['loadavg']:.2f} / {c1['loadavg']:.2f}")
    print()
    print(tables(rows, results))
    if go_note:
        print(f"grpc-go: not measured ({go_note})")
    if "python" in rows:
        print("python pp 64: not measured (the quick start's 10-thread pool serves 10 streams at once; "
              "ping-pong streams never end, so the other 54 would wait forever)")
    print()
    print(targets(rows))
    print(f"\n{results['elapsed_s']:.0f}s; every measurement in {out}")
    return 0
