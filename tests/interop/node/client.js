#!/usr/bin/env node
// Node interop client of the greeter tests: @grpc/grpc-js + @grpc/proto-loader, the proto loaded
// at run time from proto/helloworld.proto (no generated code). Driven by
// tests/interop/test_node_client.py; the modules come from .tools/node (scripts/install-tools),
// found through NODE_PATH.
//
//   node client.js PLAN_JSON
//
// PLAN_JSON: {"target": "localhost:PORT", "ca": "ca.pem", "proto": "helloworld.proto",
//             "deadline_ms": 10000, "calls": [{"rpc": "SayHello", "names": ["you"]}, ...]}
// The token, if any, comes from the environment variable GREETER_TOKEN (not argv, which other
// users can read) and is sent on every call as `authorization: Bearer TOKEN` call credentials,
// combined with TLS channel credentials that trust only the given CA.
//
// Calls run one after another, each with its own deadline. Prints one JSON line on stdout:
// {"node": VERSION, "grpc_js": VERSION, "results": [RESULT, ...]} with, per call, either
// {"rpc", "ok": true, "messages": [...]} or {"rpc", "ok": false, "code": N, "details": "...",
// "status_details_bin": BASE64 or null}. Exit 0 when the plan ran (failed RPCs are results),
// 2 on a bad plan, 3 when the whole run exceeds its bound.
"use strict";

const fs = require("fs");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

function fail(code, message) {
  process.stderr.write(`client.js: ${message}\n`);
  process.exit(code);
}

let plan;
try {
  plan = JSON.parse(process.argv[2]);
} catch (e) {
  fail(2, `usage: node client.js PLAN_JSON (${e.message})`);
}
const deadlineMs = plan.deadline_ms || 10000;
// Whatever happens (a call that never settles, a connection that hangs), the process ends.
setTimeout(() => fail(3, `still running after ${deadlineMs * (plan.calls.length + 1)} ms`),
  deadlineMs * (plan.calls.length + 1)).unref();

const definition = protoLoader.loadSync(plan.proto, {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const { Greeter } = grpc.loadPackageDefinition(definition).helloworld;

let credentials = grpc.credentials.createSsl(fs.readFileSync(plan.ca));
const token = process.env.GREETER_TOKEN;
if (token) {
  const bearer = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
    const metadata = new grpc.Metadata();
    metadata.add("authorization", `Bearer ${token}`);
    callback(null, metadata);
  });
  credentials = grpc.credentials.combineChannelCredentials(credentials, bearer);
}
const client = new Greeter(plan.target, credentials);

function deadline() {
  return new Date(Date.now() + deadlineMs);
}

function errorResult(rpc, err) {
  const bin = err.metadata ? err.metadata.get("grpc-status-details-bin") : [];
  return {
    rpc, ok: false, code: err.code, details: err.details,
    status_details_bin: bin.length ? Buffer.from(bin[0]).toString("base64") : null,
  };
}

function unary(rpc, name) {
  return new Promise((resolve) => {
    client[rpc]({ name }, { deadline: deadline() }, (err, reply) => {
      resolve(err ? errorResult(rpc, err) : { rpc, ok: true, messages: [reply.message] });
    });
  });
}

// Collects a reply stream until its status: every message, then ok (once both the OK status and
// the end of the messages are in) or the error.
function collect(rpc, call) {
  return new Promise((resolve) => {
    const messages = [];
    let settled = false;
    let ended = false;
    let ok = false;
    const settleOk = () => {
      if (!settled && ended && ok) { settled = true; resolve({ rpc, ok: true, messages }); }
    };
    call.on("data", (reply) => messages.push(reply.message));
    call.on("end", () => { ended = true; settleOk(); });
    call.on("error", (err) => {
      if (!settled) { settled = true; resolve({ ...errorResult(rpc, err), messages }); }
    });
    call.on("status", (status) => {
      if (status.code === grpc.status.OK) { ok = true; settleOk(); }
    });
  });
}

function serverStream(rpc, name) {
  return collect(rpc, client[rpc]({ name }, { deadline: deadline() }));
}

function bidi(rpc, names) {
  const call = client[rpc]({ deadline: deadline() });
  const result = collect(rpc, call);
  for (const name of names) call.write({ name });
  call.end();
  return result;
}

async function run(spec) {
  const { rpc } = spec;
  const names = spec.names || ["you"];
  switch (rpc) {
    case "SayHello":
    case "SayHelloAgain":
      return unary(rpc, names[0]);
    case "SayHelloStreamReply":
      return serverStream(rpc, names[0]);
    case "SayHelloBidiStream":
      return bidi(rpc, names);
    default:
      fail(2, `unknown rpc ${JSON.stringify(rpc)}`);
  }
}

(async () => {
  const results = [];
  for (const spec of plan.calls) results.push(await run(spec));
  client.close();
  const version = require("@grpc/grpc-js/package.json").version;
  process.stdout.write(`${JSON.stringify({ node: process.versions.node, grpc_js: version, results })}\n`);
  process.exit(0);
})().catch((e) => fail(1, e.stack || String(e)));
