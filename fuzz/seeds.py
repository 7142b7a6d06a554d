#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/TARGET/) from the requests greeter's tests make.

Byte-level targets get their inputs as such. http_connection gets the bytes real clients put on
the wire: curl's HTTP/2 (prior knowledge) and HTTP/1.1 requests, captured here by a loopback
listener, each prefixed with 0xffffffff, which `arbitrary` reads as the target's `Bytes` variant.
connect_message's inputs are a codec byte (odd: JSON), a two-byte limit, then the body.
jwt gets tokens whose every field is right (and variants), written in `arbitrary`'s encoding
of the target's input, so acceptance and the scope rules are reached from the first run.
The structured targets (request_id, trace_context, jwt) are also seeded from a short run of
their own, merged with `-set_cover_merge=1`: their inputs are `arbitrary`'s encoding.
"""

import gzip
import hashlib
import os
import socket
import subprocess
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "fuzz-static-token"
SAY_HELLO = "/helloworld.Greeter/SayHello"


def write(target, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def hello(name):
    """A HelloRequest: field 1, length-delimited."""
    raw = name.encode()
    return bytes([0x0A, len(raw)]) + raw


def frame(message, flags=0):
    return bytes([flags]) + len(message).to_bytes(4, "big") + message


def tag(index, variants):
    """The u32 (little-endian) that `arbitrary` maps to an enum's variant `index`."""
    value = -(-index * 2**32 // variants)
    assert value * variants >> 32 == index
    return value.to_bytes(4, "little")


# fuzz_targets/jwt.rs: Name's variants, and Val::Right (index 0 of 7).
ALG, KID, TYP, ISS, AUD, SUB, EXP, NBF, IAT, SCOPE = range(10)
RIGHT = tag(0, 7)


def jwt_fields(names):
    """Part::Fields (index 1 of 2), each field with its right value, then the end of the list."""
    return tag(1, 2) + b"".join(b"\x01" + tag(n, 11) + RIGHT for n in names) + b"\x00"


def capture(curl_args):
    """The bytes curl sends to a listener that never answers, on greeter's default port so the
    captured authority (hence the file) is the same on every run."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 50051))
    server.listen(1)
    port = server.getsockname()[1]
    received = bytearray()

    def accept():
        conn, _ = server.accept()
        conn.settimeout(0.5)
        try:
            while chunk := conn.recv(65536):
                received.extend(chunk)
        except socket.timeout:
            pass
        conn.close()

    thread = threading.Thread(target=accept)
    thread.start()
    subprocess.run(
        ["curl", "-s", "-m", "1", *curl_args(f"http://127.0.0.1:{port}")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    thread.join()
    server.close()
    return bytes(received)


def main():
    for value in ["1H", "250m", "99999999n", "7u", "3S", "2M", "5000", "1", "9999999999", "1.5S"]:
        write("timeouts", value.encode())

    bodies = [
        (1, b'{"name":"you"}'),
        (1, b"{}"),
        (1, gzip.compress(b'{"name":"gz"}', mtime=0)),
        (1, frame(b'{"name":"a"}') + frame(b'{"name":"b"}')),
        (0, hello("you")),
        (0, frame(hello("stream")) + frame(b"", flags=2)),
        (0, frame(gzip.compress(hello("gz"), mtime=0), flags=1)),
    ]
    for json, body in bodies:
        write("connect_message", bytes([json, 0x00, 0x10]) + body)

    ours = tag(0, 2)
    for header, claims in [
        ([ALG, KID], [ISS, AUD, SUB, EXP]),
        ([ALG, KID, TYP], [ISS, AUD, SUB, EXP, NBF, IAT, SCOPE]),
        ([ALG, KID], [ISS, AUD, SUB]),
        ([ALG], [ISS, AUD, SUB, EXP]),
    ]:
        write("jwt", jwt_fields(header) + jwt_fields(claims) + ours)

    auth = ["-H", f"authorization: Bearer {TOKEN}"]
    grpc_body = os.path.join(HERE, "target", "seed-grpc-body")
    os.makedirs(os.path.dirname(grpc_body), exist_ok=True)
    with open(grpc_body, "wb") as f:
        f.write(frame(hello("you")))
    requests = [
        # gRPC over HTTP/2, as a gRPC client sends it.
        lambda url: ["--http2-prior-knowledge", *auth, "-H", "content-type: application/grpc",
                     "-H", "te: trailers", "-H", "grpc-timeout: 5S", "-H",
                     "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                     "--data-binary", f"@{grpc_body}", url + SAY_HELLO],
        # Connect unary JSON, over HTTP/2 and HTTP/1.1.
        lambda url: ["--http2-prior-knowledge", *auth, "-H", "content-type: application/json",
                     "-H", "connect-protocol-version: 1", "-H", "connect-timeout-ms: 5000",
                     "-d", '{"name":"you"}', url + SAY_HELLO],
        lambda url: ["--http1.1", *auth, "-H", "content-type: application/json",
                     "-H", "x-request-id: abc-123", "-d", '{"name":"you"}', url + SAY_HELLO],
        # Connect server stream, enveloped JSON.
        lambda url: ["--http2-prior-knowledge", *auth, "-H", "content-type: application/connect+json",
                     "--data-binary", f"@{grpc_body}",
                     url + "/helloworld.Greeter/SayHelloStreamReply"],
        # grpc-web, binary and text, over HTTP/1.1 as browsers send it.
        lambda url: ["--http1.1", *auth, "-H", "content-type: application/grpc-web+proto",
                     "-H", "x-grpc-web: 1", "--data-binary", f"@{grpc_body}", url + SAY_HELLO],
        lambda url: ["--http1.1", *auth, "-H", "content-type: application/grpc-web-text",
                     "-d", "AAAAAAUKA3lvdQ==", url + SAY_HELLO],
        # A CORS preflight and the page at /.
        lambda url: ["--http1.1", "-X", "OPTIONS", "-H", "origin: https://app.example.com",
                     "-H", "access-control-request-method: POST", url + SAY_HELLO],
        lambda url: ["--http2-prior-knowledge", url + "/"],
    ]
    for request in requests:
        write("http_connection", b"\xff\xff\xff\xff" + capture(request))


if __name__ == "__main__":
    main()
