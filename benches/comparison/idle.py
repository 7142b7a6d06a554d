"""RSS per idle HTTP/2 connection. The holder opens N HTTP/2 connections (preface + SETTINGS,
ACK the server's SETTINGS, answer PINGs) and holds them until stdin closes; it runs as a child
process (`benches/compare --hold-connections PORT N [--ca CA]`, hidden from --help) on the load
generator core, so that it has its own fd limit and the orchestrator stays responsive, and
measure_idle_connections reads the server's RSS before and after.
"""

import asyncio
import json
import ssl
import subprocess
import sys
import time

from . import host
from .host import pinned, rss_kib


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


async def hold_connections(port, count, ca, parallel=256):
    context = None
    if ca:
        context = ssl.create_default_context(cafile=ca)
        context.set_alpn_protocols(["h2"])
    gate = asyncio.Semaphore(parallel)
    held, failed = [], []

    async def read_frame(reader):
        header = await reader.readexactly(9)
        payload = await reader.readexactly(int.from_bytes(header[:3], "big"))
        return header[3], header[4], payload

    async def one():
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=context,
                    server_hostname="localhost" if context else None), 30)
                writer.write(HTTP2_PREFACE + h2_frame(4, 0, 0))
                await writer.drain()
                while True:
                    kind, flags, _ = await asyncio.wait_for(read_frame(reader), 30)
                    if kind == 4 and not flags & 1:  # the server's SETTINGS
                        writer.write(h2_frame(4, 1, 0))  # ACK
                        await writer.drain()
                        break
                held.append((reader, writer))
            except Exception as e:  # noqa: BLE001 - counted, reported
                failed.append(repr(e))

    async def pump(reader, writer):
        try:
            while True:
                kind, flags, payload = await read_frame(reader)
                if kind == 6 and not flags & 1:  # PING: answer, or keepalive closes us
                    writer.write(h2_frame(6, 1, 0, payload))
        except Exception:  # noqa: BLE001 - the server went away
            pass

    await asyncio.gather(*(one() for _ in range(count)))
    pumps = [asyncio.create_task(pump(r, w)) for r, w in held]
    print(json.dumps({"held": len(held), "failed": len(failed), "first_error": failed[:1]}),
          flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in pumps:
        task.cancel()
    for _, writer in held:
        writer.close()


def measure_idle_connections(running, count, ca):
    rss0 = rss_kib(running.pid)
    # benches/compare's own invocation (see there; PYTHONPATH is inherited) with the hidden option.
    holder = subprocess.Popen([sys.executable, "-P", "-m", __package__, sys.argv[0], "--hold-connections",
                               str(running.peer.port), str(count)] + (["--ca", ca] if ca else []),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              preexec_fn=pinned(host.LOAD_CPU))
    try:
        line = holder.stdout.readline()
        result = json.loads(line) if line else {"held": 0, "failed": count, "first_error": ["holder died"]}
        time.sleep(1.0)
        rss1 = rss_kib(running.pid)
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
    held = result["held"]
    return {
        "connections": held, "failed": result["failed"], "first_error": result["first_error"],
        "rss_before_kib": rss0, "rss_after_kib": rss1,
        "kib_per_connection": (rss1 - rss0) / held if held else None,
    }
