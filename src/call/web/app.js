// greeter's page: a hand-written grpc-web client for helloworld.Greeter.
//
// Why no generated code (protoc-gen-grpc-web, protobuf-es, ...): those need a build toolchain
// (protoc plugins, npm, a bundler), and this page is served as-is from the binary with no build
// step. The contract is tiny: HelloRequest and HelloReply are one message each with one string
// field (number 1), so encoding and decoding them by hand is a few lines, shown below.
//
// Wire format (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md): the request body
// and the response body are sequences of frames: 1 flag byte, a 4-byte big-endian length, then
// that many bytes. Flag 0x00 is a message (protobuf); flag 0x80 is the trailers, as HTTP/1 header
// lines ("grpc-status: 0\r\n"). An error before any message may instead come "trailers-only":
// grpc-status and grpc-message as HTTP response headers and an empty body.
"use strict";

const CODE_NAMES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];

// ---- protobuf: HelloRequest { string name = 1; } and HelloReply { string message = 1; } ----

function encodeVarint(n, out) {
  while (n > 0x7f) {
    out.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
}

function encodeHelloRequest(name) {
  const utf8 = new TextEncoder().encode(name);
  if (utf8.length === 0) return new Uint8Array(0); // proto3 omits a default (empty) string
  const head = [0x0a]; // field 1, wire type 2 (length-delimited)
  encodeVarint(utf8.length, head);
  const msg = new Uint8Array(head.length + utf8.length);
  msg.set(head, 0);
  msg.set(utf8, head.length);
  return msg;
}

// Reads a varint at pos; returns [value, next pos]. Values past 2^53 lose precision, which
// only matters for skipped integer fields, never for lengths this page accepts.
function readVarint(bytes, pos) {
  let value = 0;
  for (let shift = 0; shift < 64; shift += 7) {
    if (pos >= bytes.length) throw new Error("truncated varint");
    const b = bytes[pos++];
    value += (b & 0x7f) * 2 ** shift;
    if (b < 0x80) return [value, pos];
  }
  throw new Error("varint longer than 10 bytes");
}

function decodeHelloReply(bytes) {
  let message = "";
  let pos = 0;
  while (pos < bytes.length) {
    let key, len;
    [key, pos] = readVarint(bytes, pos);
    const field = Math.floor(key / 8);
    const wireType = key % 8;
    switch (wireType) {
      case 0: [, pos] = readVarint(bytes, pos); break; // varint
      case 1: pos += 8; break; // fixed64
      case 5: pos += 4; break; // fixed32
      case 2: // length-delimited
        [len, pos] = readVarint(bytes, pos);
        if (pos + len > bytes.length) throw new Error("truncated field");
        if (field === 1) message = new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(pos, pos + len));
        pos += len;
        break;
      default: throw new Error(`unsupported wire type ${wireType}`); // groups (3, 4): not proto3
    }
    if (pos > bytes.length) throw new Error("truncated field");
  }
  return message;
}

// ---- grpc-web ------------------------------------------------------------------------------

function frame(flag, payload) {
  const out = new Uint8Array(5 + payload.length);
  out[0] = flag;
  new DataView(out.buffer).setUint32(1, payload.length); // big-endian
  out.set(payload, 5);
  return out;
}

// "key: value\r\n" lines -> { key: value }, keys lowercased.
function parseTrailers(bytes) {
  const trailers = {};
  for (const line of new TextDecoder().decode(bytes).split("\r\n")) {
    const colon = line.indexOf(":");
    if (colon > 0) trailers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  return trailers;
}

function decodeGrpcMessage(raw) {
  try {
    return decodeURIComponent(raw);
  } catch {
    return raw; // not valid percent-encoding: show it as sent
  }
}

// A failed call. `code` is the gRPC status code (null when the call got none: network or HTTP
// errors); the message is the status line the page shows.
class GrpcError extends Error {
  constructor(code, detail) {
    super(code === null ? detail : `${CODE_NAMES[code] || "UNKNOWN"} (${code})${detail ? ": " + detail : ""}`);
    this.code = code;
  }
}
const INTERNAL = 13;

function decodeOrFail(payload) {
  try {
    return decodeHelloReply(payload);
  } catch (e) {
    throw new GrpcError(INTERNAL, `cannot decode HelloReply: ${e.message}`);
  }
}

// Calls a server-streaming (or unary) method with one HelloRequest; onMessage(text) runs for each
// HelloReply as its frame arrives. Resolves once the call ended OK; otherwise throws a GrpcError
// whose message is the status line to show.
async function call(server, method, name, token, signal, onMessage) {
  const headers = {
    "content-type": "application/grpc-web+proto",
    "x-grpc-web": "1",
    "x-user-agent": "greeter-web/1",
    "grpc-timeout": "30S",
  };
  if (token) headers.authorization = `Bearer ${token}`;
  const url = `${server.replace(/\/+$/, "")}/helloworld.Greeter/${method}`;

  let response;
  try {
    response = await fetch(url, { method: "POST", headers, body: frame(0x00, encodeHelloRequest(name)), signal });
  } catch (e) {
    // Network failure, refused connection, or a cross-origin call the server's CORS did not allow.
    throw new GrpcError(null, `network error: ${e.message} (${url})`);
  }
  if (response.status !== 200) {
    response.body?.cancel(); // release the connection; the body is not a grpc-web answer
    throw new GrpcError(null, `HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}`);
  }

  // Read the body as it arrives, cutting complete frames off the front of the buffer.
  let trailers = null;
  let buffer = new Uint8Array(0);
  const reader = response.body.getReader();
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        throw new GrpcError(null, `network error: ${e.message} (response cut off)`);
      }
      if (chunk.done) break;
      const joined = new Uint8Array(buffer.length + chunk.value.length);
      joined.set(buffer, 0);
      joined.set(chunk.value, buffer.length);
      buffer = joined;
      while (buffer.length >= 5) {
        const flag = buffer[0];
        const len = new DataView(buffer.buffer, buffer.byteOffset).getUint32(1);
        if (buffer.length < 5 + len) break; // frame not complete yet
        const payload = buffer.subarray(5, 5 + len);
        buffer = buffer.subarray(5 + len);
        if (flag & 0x80) trailers = parseTrailers(payload);
        else if (flag & 0x01) throw new GrpcError(INTERNAL, "compressed message, none was asked for");
        else if (trailers) throw new GrpcError(INTERNAL, "message after trailers");
        else onMessage(decodeOrFail(payload));
      }
    }
  } catch (e) {
    reader.cancel().catch(() => {}); // stop the download, release the connection
    throw e;
  }
  if (buffer.length > 0) throw new GrpcError(INTERNAL, `body ended inside a frame (${buffer.length} bytes left)`);

  // Trailers-only response: the status is in the HTTP headers.
  if (!trailers && response.headers.has("grpc-status")) {
    trailers = { "grpc-status": response.headers.get("grpc-status"), "grpc-message": response.headers.get("grpc-message") || "" };
  }
  if (!trailers || !/^\d+$/.test(trailers["grpc-status"] || "")) {
    throw new GrpcError(INTERNAL, "response ended without grpc-status");
  }
  const code = Number(trailers["grpc-status"]);
  if (code !== 0) {
    throw new GrpcError(code, decodeGrpcMessage(trailers["grpc-message"] || ""));
  }
}

// ---- the page ------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
let current = null; // AbortController of the call in progress; a new call aborts it

function setStatus(state, text, code = "") {
  $("status").dataset.state = state;
  $("status").dataset.code = code; // the gRPC code, when the call got one
  $("status").textContent = text;
}

async function run(method) {
  if (current) current.abort();
  const controller = new AbortController();
  current = controller;
  $("reply").textContent = "";
  $("greetings").replaceChildren();
  setStatus("running", `calling ${method}…`);

  const server = $("server").value.trim() || location.origin;
  let replies = 0;
  const onMessage = (text) => {
    if (controller.signal.aborted) return;
    replies += 1;
    if (method === "SayHello") {
      $("reply").textContent = text;
    } else {
      const li = document.createElement("li");
      li.textContent = text;
      $("greetings").append(li);
    }
  };
  try {
    await call(server, method, $("name").value, $("token").value.trim(), controller.signal, onMessage);
    if (method === "SayHello" && replies !== 1) throw new GrpcError(INTERNAL, `${replies} replies to a unary call`);
    if (!controller.signal.aborted) setStatus("ok", "OK", "0");
  } catch (e) {
    if (controller.signal.aborted) return; // superseded by a newer call: it owns the outputs now
    if (e instanceof GrpcError) setStatus("error", e.message, e.code === null ? "" : String(e.code));
    else setStatus("error", `error: ${e.message}`);
  } finally {
    if (current === controller) current = null;
  }
}

function init() {
  const fromQuery = new URLSearchParams(location.search).get("server");
  // A page opened from a file has origin "null": leave the field for the user to fill in.
  $("server").value = fromQuery || (location.origin.startsWith("http") ? location.origin : "");
  $("call-form").addEventListener("submit", (event) => {
    event.preventDefault(); // never navigate (the CSP's form-action 'none' would refuse it anyway)
    // Enter in a field submits with the first button: Say hello.
    run(event.submitter && event.submitter.id === "stream" ? "SayHelloStreamReply" : "SayHello");
  });
}

init();
