"""An OTLP trace sink for the tracing peers: a grpcio server answering
opentelemetry.proto.collector.trace.v1.TraceService/Export with an empty (valid) response, the
request left undecoded. It measures what exporting costs greeter, not what a collector does with
the spans. Runs as a child of the benchmark (start()), pinned off the servers' core.
"""

import atexit
import subprocess
import sys
import time
from concurrent import futures

from . import VENV_PY, host
from .host import free_port, pinned

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def serve(port):
    import grpc

    def export(request, context):
        return b""  # an ExportTraceServiceResponse with no field set

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def start():
    """Starts the sink; returns its port. It is stopped when the benchmark exits."""
    port = free_port()
    proc = subprocess.Popen([str(VENV_PY), "-P", "-c", f"from comparison.sink import serve; serve({port})"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sys.stderr,
                            preexec_fn=pinned(host.LOAD_CPU))
    atexit.register(proc.kill)
    import socket
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the OTLP sink did not start")
            time.sleep(0.02)
