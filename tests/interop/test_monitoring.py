"""The monitoring component against the real thing: promtool on the rules and their unit tests,
then a real Prometheus (Debian's `prometheus`, installed by scripts/install-tools) scraping a
real greeter every second, with the rules loaded (windows and `for` durations shortened in the
test's copy: minutes become seconds, hours minutes):

* every rule and every dashboard query evaluates without error, and every series they name
  exists in what the scrape produced;
* 30% of SayHello failing UNAVAILABLE on purpose ([faults]) fires the fast availability burn
  alert, and the alert that says faults are injected;
* a server certificate and a client CA expiring within 14 days fire their alerts, and the CA's
  and the CRL's dates reach Prometheus;
* grpcio with a service-config retryPolicy gets every call through 30% injected UNAVAILABLE;
  without the policy it sees the failures.

The certificates and the CRL are made here with `cryptography`, so their dates are known."""

import datetime
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import helloworld_pb2 as pb
import helloworld_pb2_grpc
from conftest import (ROOT, RPC_TIMEOUT, GreeterProcess, free_port, new_token, tail, tls_channel,
                      toml_str, two_free_ports)

MONITORING = ROOT / "deploy" / "k8s" / "components" / "monitoring"
RULES = MONITORING / "rules.yaml"
DASHBOARD = MONITORING / "dashboard.json"
RULES_TEST = ROOT / "tests" / "monitoring" / "rules_test.yaml"
WAIT = 120.0  # seconds any awaited event may take on a loaded machine
NOW = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
CERT_DAYS, CA_DAYS, CRL_DAYS = 5, 10, 3
SAY_HELLO = "/helloworld.Greeter/SayHello"


def tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: scripts/install-tools installs Debian's prometheus package",
                    pytrace=False)
    return path


def run(*argv):
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL, cwd=ROOT)
    assert res.returncode == 0, f"{' '.join(map(str, argv))}: exit {res.returncode}\n" \
                                f"{res.stdout}{res.stderr}"
    return res.stdout


def test_rules_pass_promtool_and_their_unit_tests():
    promtool = tool("promtool")
    assert "SUCCESS" in run(promtool, "check", "rules", RULES)
    # Every alert of the file has unit tests.
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M))
    tested = set(re.findall(r"^\s+alertname: (\w+)$", RULES_TEST.read_text(), re.M))
    assert alerts and alerts <= tested, f"alerts without a unit test: {sorted(alerts - tested)}"
    assert "SUCCESS" in run(promtool, "test", "rules", RULES_TEST)
    # The PrometheusRule holds the same groups.
    run(ROOT / "scripts" / "monitoring-rules", "--check")


def shortened(rules):
    """The test's copy of the rules: windows and `for` durations in seconds instead of minutes,
    minutes instead of hours, so that a minute of traffic shows what an hour would."""
    rules = re.sub(r"\[(\d+)m\]", r"[\1s]", rules)
    rules = re.sub(r"\[(\d+)h\]", r"[\1m]", rules)
    rules = re.sub(r"^(\s+for: \d+)m$", r"\1s", rules, flags=re.M)
    assert not re.search(r"\[\d+[dh]\]|for: \d+[hm]$", rules, re.M)
    return rules


# ---- a PKI whose dates the test knows ----------------------------------------------------------

def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Dates:
    ca: Path
    cert: Path
    key: Path
    crl: Path
    cert_not_after: int
    ca_not_after: int
    crl_next_update: int
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey


def make_pki(out):
    """A CA valid for CA_DAYS, a server certificate for localhost valid for CERT_DAYS, and an empty
    CRL of the CA whose nextUpdate is CRL_DAYS away."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_until = NOW + datetime.timedelta(days=CA_DAYS)
    ca = (x509.CertificateBuilder()
          .subject_name(_name("monitoring test CA")).issuer_name(_name("monitoring test CA"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(ca_until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert_until = NOW + datetime.timedelta(days=CERT_DAYS)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(cert_until)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    crl_next = NOW + datetime.timedelta(days=CRL_DAYS)
    paths = {name: out / name for name in ("ca.pem", "server.pem", "server.key", "ca.crl")}
    paths["ca.pem"].write_bytes(_pem(ca))
    paths["server.pem"].write_bytes(_pem(cert))
    paths["server.key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    dates = Dates(ca=paths["ca.pem"], cert=paths["server.pem"], key=paths["server.key"],
                  crl=paths["ca.crl"], cert_not_after=int(cert_until.timestamp()),
                  ca_not_after=int(ca_until.timestamp()), crl_next_update=int(crl_next.timestamp()),
                  ca_cert=ca, ca_key=ca_key)
    write_crl(dates, 1, crl_next)
    return dates


def write_crl(dates, number, next_update):
    """Publishes an empty CRL of the CA, numbered `number`, promising the next by `next_update`."""
    crl = (x509.CertificateRevocationListBuilder()
           .issuer_name(dates.ca_cert.subject).last_update(NOW - datetime.timedelta(hours=1))
           .next_update(next_update)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
               dates.ca_key.public_key()), critical=False)
           .add_extension(x509.CRLNumber(number), critical=False)
           .sign(dates.ca_key, hashes.SHA256()))
    dates.crl.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


# ---- the stack: greeter, traffic, Prometheus ---------------------------------------------------

class Prometheus:
    """`prometheus` on a free loopback port, its storage in a temporary directory."""

    def __init__(self, workdir, scrape_target, rules):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "rules.yaml").write_text(rules)
        (workdir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "rule_files:\n  - rules.yaml\n"
            "scrape_configs:\n  - job_name: greeter\n"
            f"    static_configs:\n      - targets: [{json.dumps(scrape_target)}]\n")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            wait_for(lambda: self.ready(), "Prometheus ready", self)
        except BaseException:
            self.stop()
            raise

    def ready(self):
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{tail(self.log)}",
                        pytrace=False)
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path, **params):
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=30) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        try:
            return self.api("query", query=expr)["result"]
        except urllib.error.HTTPError as e:
            pytest.fail(f"{expr}: {e.code} {e.read().decode(errors='replace')}", pytrace=False)

    def alert_states(self):
        return {(a["labels"]["alertname"], a["state"]) for a in self.api("alerts")["alerts"]}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def wait_for(check, what, prometheus=None):
    """Polls `check` until it is true, for at most WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            log = f"\nprometheus log:\n{tail(prometheus.log)}" if prometheus else ""
            pytest.fail(f"{what}: not within {WAIT:.0f}s{log}", pytrace=False)
        time.sleep(0.5)


class Traffic(threading.Thread):
    """Calls SayHello (30% of which fail on purpose) and SayHelloAgain until stopped."""

    def __init__(self, target, ca, token):
        super().__init__(daemon=True)
        self.target, self.ca, self.token = target, ca, token
        self.done = threading.Event()
        self.calls = 0

    def run(self):
        with tls_channel(self.target, self.ca, self.token) as channel:
            stub = helloworld_pb2_grpc.GreeterStub(channel)
            while not self.done.is_set():
                for method in (stub.SayHello, stub.SayHelloAgain):
                    try:
                        method(pb.HelloRequest(name="traffic"), timeout=RPC_TIMEOUT)
                    except grpc.RpcError:
                        pass
                    self.calls += 1
                self.done.wait(0.01)

    def stop(self):
        self.done.set()
        self.join(timeout=30)


@dataclass
class Stack:
    server: GreeterProcess
    prometheus: Prometheus
    dates: Dates
    traffic: Traffic


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tool("prometheus")
    workdir = tmp_path_factory.mktemp("monitoring")
    dates = make_pki(workdir / "pki")
    tokens_file = workdir / "tokens.toml"
    token = new_token(tokens_file, "rehearsal", ["greeter", "faults"])
    port, probe_port = two_free_ports()
    probe_addr = f"127.0.0.1:{probe_port}"
    config = workdir / "greeter.toml"
    config.write_text(
        "[tls]\nenabled = true\n"
        f"cert = {toml_str(dates.cert)}\nkey = {toml_str(dates.key)}\n"
        f"client_ca = {toml_str(dates.ca)}\nclient_auth = \"optional\"\n"
        f"client_crl_files = [{toml_str(dates.crl)}]\n"
        f"[auth]\nenabled = true\ntokens_file = {toml_str(tokens_file)}\n"
        f"[probe]\nlisten = {toml_str(probe_addr)}\n"
        "[quota]\nenabled = true\nrate = 100000.0\nburst = 100000\n"
        "[log]\nfilter = \"info,greeter::access=off\"\n"
        "[faults]\nenabled = true\n"
        f"[faults.methods.{toml_str(SAY_HELLO)}]\npercent = 30\ncode = \"UNAVAILABLE\"\n")
    server = GreeterProcess(workdir / "server", config=config, health_addr=probe_addr, port=port)
    prometheus = traffic = None
    try:
        assert server.metrics_addr, "the greeter binary serves metrics"
        prometheus = Prometheus(workdir / "prometheus", server.metrics_addr,
                                shortened(RULES.read_text()))
        traffic = Traffic(f"localhost:{port}", dates.ca.read_bytes(), token)
        traffic.start()
        yield Stack(server=server, prometheus=prometheus, dates=dates, traffic=traffic)
    finally:
        if traffic:
            traffic.stop()
        if prometheus:
            prometheus.stop()
        server.stop()


def firing(prometheus, *alerts):
    states = prometheus.alert_states()
    return all((alert, "firing") in states for alert in alerts)


def test_injected_unavailable_over_the_budget_fires_the_fast_burn_alert(stack):
    prometheus = stack.prometheus
    wait_for(lambda: firing(prometheus, "GreeterAvailabilityBudgetBurnFast",
                            "GreeterFaultsInjected"),
             "GreeterAvailabilityBudgetBurnFast and GreeterFaultsInjected firing", prometheus)
    # The errors are the injected ones, and Prometheus can tell: the faults' own rate.
    injected = prometheus.query(
        'greeter:faults_injected:rate5m{grpc_method="SayHello",kind="error"}')
    assert injected and float(injected[0]["value"][1]) > 0, injected
    # Calls are fast: the latency objective is not burning.
    assert ("GreeterLatencyBudgetBurnFast", "firing") not in prometheus.alert_states()


def test_a_certificate_and_a_client_ca_near_expiry_fire_their_alerts(stack):
    prometheus, dates = stack.prometheus, stack.dates
    wait_for(lambda: firing(prometheus, "GreeterCertificateExpiresSoon",
                            "GreeterClientCaExpiresSoon"),
             "the expiry alerts firing", prometheus)
    for metric, expected in [
        ("greeter_tls_certificate_expiry_timestamp_seconds", dates.cert_not_after),
        ("greeter_tls_client_ca_expiry_timestamp_seconds", dates.ca_not_after),
        ("greeter_tls_crl_next_update_timestamp_seconds", dates.crl_next_update),
    ]:
        result = prometheus.query(metric)
        assert [float(r["value"][1]) for r in result] == [expected], (metric, result)
    # A CRL three days from its nextUpdate is not stale.
    assert ("GreeterCrlStale", "firing") not in prometheus.alert_states()

    # A CRL past its nextUpdate, published in place: greeter reloads it (tls.reload_interval),
    # the gauge follows, and the stale-CRL alert fires.
    overdue = NOW - datetime.timedelta(minutes=5)
    write_crl(dates, 2, overdue)
    wait_for(lambda: [float(r["value"][1]) for r in prometheus.query(
        "greeter_tls_crl_next_update_timestamp_seconds")] == [overdue.timestamp()],
             "the CRL gauge following the reload", prometheus)
    wait_for(lambda: firing(prometheus, "GreeterCrlStale"), "GreeterCrlStale firing", prometheus)


# PromQL words that are not series names.
PROMQL_WORDS = {"histogram_quantile", "label_values"}


def series_named(expr):
    """The series names an expression reads: identifiers outside label matchers and groupings
    that look like metric names (an underscore or a colon)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {n for n in names if ("_" in n or ":" in n) and n not in PROMQL_WORDS}


def scraped_and_recorded(prometheus, rules):
    """Waits until every rule has been evaluated and every recording rule has a result; returns
    every series name Prometheus holds."""
    def evaluated():
        current = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return all(r["lastEvaluation"] and not r["lastEvaluation"].startswith("0001")
                   for r in current) and all(
            prometheus.query(r["name"]) for r in current if r["type"] == "recording")
    wait_for(evaluated, "every rule evaluated, every recording rule with a result", prometheus)
    return set(prometheus.api("label/__name__/values"))


def test_every_rule_evaluates_against_the_live_scrape(stack):
    prometheus = stack.prometheus
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    written = re.findall(r"^\s+- (?:alert|record): (\S+)$", RULES.read_text(), re.M)
    assert sorted(r["name"] for r in rules) == sorted(written), "Prometheus loaded every rule"
    names = scraped_and_recorded(prometheus, rules)
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        missing = series_named(rule["query"]) - names
        assert not missing, f"{rule['name']} reads series nothing produced: {sorted(missing)}"
        prometheus.query(rule["query"])


def panel_queries(dashboard):
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner["title"], target["expr"]


def test_every_dashboard_query_evaluates_against_the_live_scrape(stack):
    prometheus = stack.prometheus
    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(panel_queries(dashboard))
    assert len(queries) >= 10, queries
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) >= {"datasource", "job"}, variables
    names = scraped_and_recorded(prometheus, None)
    # The job variable's own query finds the scraped job.
    job_query = variables["job"]["query"]["query"]
    metric = re.fullmatch(r"label_values\((\w+), job\)", job_query).group(1)
    assert {r["metric"]["job"] for r in prometheus.query(metric)} == {"greeter"}
    for title, expr in queries:
        concrete = expr.replace("$__rate_interval", "1m").replace("$job", "greeter")
        assert "$" not in concrete, (title, expr)
        missing = series_named(concrete) - names
        assert not missing, f"panel {title!r} reads series nothing produced: {sorted(missing)}"
        assert prometheus.query(concrete), f"panel {title!r}: no result for {concrete}"


# ---- a real client's retry policy ----------------------------------------------------------------

RETRY_POLICY = {
    "methodConfig": [{
        "name": [{"service": "helloworld.Greeter"}],
        "retryPolicy": {
            "maxAttempts": 3,
            "initialBackoff": "0.01s",
            "maxBackoff": "0.1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
}


def say_hello_50_times(addr, options):
    """SayHello 50 times, one after the other; returns the codes of the failures."""
    failures = []
    with grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1), *options]) \
            as channel:
        stub = helloworld_pb2_grpc.GreeterStub(channel)
        for i in range(50):
            try:
                assert stub.SayHello(pb.HelloRequest(name=f"r{i}"),
                                     timeout=RPC_TIMEOUT).message == f"Hello, r{i}!"
            except grpc.RpcError as e:
                failures.append(e.code())
    return failures


def injected_errors(server):
    with urllib.request.urlopen(f"http://{server.metrics_addr}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("greeter_faults_injected_total{")
               and 'kind="error"' in line and 'grpc_method="SayHello"' in line)


def test_a_retry_policy_rides_out_injected_unavailable(tmp_path):
    config = tmp_path / "greeter.toml"
    config.write_text("[faults]\nenabled = true\n"
                      f"[faults.methods.{toml_str(SAY_HELLO)}]\npercent = 30\n"
                      "code = \"UNAVAILABLE\"\n")
    server = GreeterProcess(tmp_path / "server", config=config)
    try:
        assert server.metrics_addr, "the greeter binary serves metrics"
        with_policy = say_hello_50_times(server.addr, [
            ("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_POLICY))])
        assert with_policy == [], "every call gets through with the retry policy"
        retried = injected_errors(server)
        # 30% of the attempts failed and were retried: 50 calls took about 72 attempts.
        assert retried >= 15, f"the policy rode out {retried} injected failures"

        without = say_hello_50_times(server.addr, [("grpc.enable_retries", 0)])
        # 30% of any 50 calls in a row, exactly: the share is spread evenly.
        assert without == [grpc.StatusCode.UNAVAILABLE] * 15, without
        assert injected_errors(server) == retried + 15
    finally:
        server.stop()
