"""JWT bearer tokens ([auth.jwt]) minted by an independent implementation: PyJWT with the
`cryptography` backend, in the shape the Kubernetes API server gives a projected service-account
token (iss, aud, sub = system:serviceaccount:NS:SA, a kubernetes.io claim, exp/nbf/iat).

One greeter of this module's own (plaintext on loopback, auth on, mode "token"), trusting one
issuer whose JWKS holds an RSA, an EC P-256 and an Ed25519 key; the rule
sub = system:serviceaccount:shop:* grants "greeter". Calls carry the token as grpcio metadata.
"""

import base64
import hashlib
import hmac
import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

import helloworld_pb2 as pb
import helloworld_pb2_grpc
from conftest import RPC_TIMEOUT, GreeterProcess, greeter_cli, toml_str

ISSUER = "https://kubernetes.default.svc.cluster.local"
SUBJECT = "system:serviceaccount:shop:checkout"
RELOAD = 0.2  # auth.reload_interval of the server, seconds


def new_key(alg):
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def jwk(kid, alg, private_key):
    """The public JWK as the API server's /openid/v1/jwks lists it (kid, alg, use)."""
    to_jwk = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[alg].to_jwk
    key = to_jwk(private_key.public_key(), as_dict=True)
    return {**key, "kid": kid, "alg": alg, "use": "sig"}


class Signer:
    def __init__(self, kid, alg):
        self.kid, self.alg, self.key = kid, alg, new_key(alg)

    def jwk(self):
        return jwk(self.kid, self.alg, self.key)

    def token(self, **overrides):
        return jwt.encode(claims(**overrides), self.key, algorithm=self.alg,
                          headers={"kid": self.kid})


def claims(namespace="shop", account="checkout", lifetime=3600, not_before=-5, **overrides):
    """A projected service-account token's claims, valid now for `lifetime` seconds."""
    now = int(time.time())
    body = {
        "aud": ["greeter"],
        "exp": now + lifetime,
        "iat": now + min(not_before, 0),
        "iss": ISSUER,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "node-1", "uid": str(uuid.uuid4())},
            "pod": {"name": f"{account}-7c9f-abcde", "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": account, "uid": str(uuid.uuid4())},
        },
        "nbf": now + not_before,
        "sub": f"system:serviceaccount:{namespace}:{account}",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def write_jwks(path, signers):
    """Replaces the file at once, as a ConfigMap update does (a rename, never a partial file)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": [s.jwk() for s in signers]}))
    tmp.replace(path)


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def signers():
    return {alg: Signer(f"{alg.lower()}-1", alg) for alg in ("RS256", "ES256", "EdDSA")}


@pytest.fixture(scope="module")
def jwt_greeter(tmp_path_factory, signers):
    base = tmp_path_factory.mktemp("jwt")
    jwks = base / "jwks.json"
    write_jwks(jwks, signers.values())
    tokens = base / "tokens.toml"
    tokens.write_text("")
    config = base / "greeter.toml"
    config.write_text(
        "[auth]\n"
        "enabled = true\n"
        f"tokens_file = {toml_str(tokens)}\n"
        f'reload_interval = "{int(RELOAD * 1000)}ms"\n'
        "\n[[auth.jwt.issuers]]\n"
        f"issuer = {toml_str(ISSUER)}\n"
        f"jwks_file = {toml_str(jwks)}\n"
        'audiences = ["greeter"]\n'
        "\n[[auth.jwt.rules]]\n"
        'claim = "sub"\n'
        'pattern = "system:serviceaccount:shop:*"\n'
        'scopes = ["greeter"]\n')
    server = GreeterProcess(base / "server", config=config)
    server.jwks = jwks
    yield server
    server.stop()


def say_hello(server, token):
    with grpc.insecure_channel(server.addr) as channel:
        stub = helloworld_pb2_grpc.GreeterStub(channel)
        return stub.SayHello(pb.HelloRequest(name="you"), timeout=RPC_TIMEOUT,
                             metadata=[("authorization", f"Bearer {token}")]).message


def refused(server, token):
    with pytest.raises(grpc.RpcError) as err:
        message = say_hello(server, token)
        pytest.fail(f"SayHello answered {message!r}")
    assert token not in err.value.details()
    return err.value


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_service_account_token_is_accepted(jwt_greeter, signers, alg):
    assert say_hello(jwt_greeter, signers[alg].token()) == "Hello, you!"


def test_access_line_names_the_subject_never_the_token(jwt_greeter, signers):
    token = signers["ES256"].token(account="access-log")
    assert say_hello(jwt_greeter, token) == "Hello, you!"
    deadline = time.monotonic() + 5
    log = ""
    while "system:serviceaccount:shop:access-log" not in log and time.monotonic() < deadline:
        time.sleep(0.05)
        log = jwt_greeter.stderr_path.read_text(errors="replace")
    assert "system:serviceaccount:shop:access-log" in log
    assert token not in log and token.split(".")[2] not in log


def test_subject_no_rule_grants_is_permission_denied(jwt_greeter, signers):
    err = refused(jwt_greeter, signers["RS256"].token(namespace="other"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())
    assert "system:serviceaccount:other:checkout" in err.details()


def hs256_with_public_key(signer):
    """The classic algorithm confusion: HMAC keyed with the RSA public key, which a verifier that
    lets the header pick the algorithm would accept. Made by hand: PyJWT refuses to."""
    public = signer.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": signer.kid}).encode())
    body = b64(json.dumps(claims()).encode())
    mac = hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def tampered(signer):
    """A valid token whose payload now names another namespace; the signature is the original."""
    head, _, sig = signer.token(namespace="other").split(".")
    body = b64(json.dumps(claims(namespace="shop")).encode())
    return f"{head}.{body}.{sig}"


def alg_none():
    """Unsigned: the signature part is empty."""
    return jwt.encode(claims(), None, algorithm="none", headers={"kid": "rs256-1"})


REFUSALS = {
    "expired": (lambda s: s["RS256"].token(lifetime=-120), "expired"),
    "not yet valid": (lambda s: s["RS256"].token(not_before=600), "not valid yet"),
    "issued in the future": (lambda s: s["ES256"].token(iat=int(time.time()) + 600), "issued in the future"),
    "wrong audience": (lambda s: s["ES256"].token(aud=["vault"]), "audience"),
    "wrong issuer": (lambda s: s["EdDSA"].token(iss="https://evil.example"), "issuer"),
    "unknown kid": (lambda s: jwt.encode(claims(), s["RS256"].key, algorithm="RS256",
                                         headers={"kid": "rotated-away"}), "kid"),
    "alg none": (lambda s: alg_none(), "algorithm"),
    "HS256 with the public key": (lambda s: hs256_with_public_key(s["RS256"]), "algorithm"),
    "key of another type": (lambda s: jwt.encode(claims(), s["ES256"].key, algorithm="ES256",
                                                  headers={"kid": "rs256-1"}), "match its key"),
    "signed by another key": (lambda s: jwt.encode(claims(), new_key("RS256"), algorithm="RS256",
                                                    headers={"kid": "rs256-1"}), "signature"),
    "tampered payload": (lambda s: tampered(s["RS256"]), "signature"),
    "no exp": (lambda s: s["RS256"].token(exp=None), "exp"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_token_is_unauthenticated(jwt_greeter, signers, case):
    make, reason = REFUSALS[case]
    err = refused(jwt_greeter, make(signers))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (err.code(), err.details())
    assert reason in err.details(), err.details()


def test_jwks_rotated_while_calls_run(jwt_greeter, signers):
    """The ConfigMap is rewritten with a new key beside the old, then without the old: calls signed
    by a key still in the set never fail; once a key is gone, its tokens are refused (the cache of
    verified tokens does not outlive the key)."""
    old, new = signers["RS256"], Signer("rs256-2", "RS256")
    old_token, new_token = old.token(), new.token()
    others = [signers["ES256"], signers["EdDSA"]]
    failures, calls = [], [0]
    stop = threading.Event()

    def call_with_old_key():
        while not stop.is_set():
            try:
                say_hello(jwt_greeter, old_token)
                calls[0] += 1
            except grpc.RpcError as e:
                failures.append(f"{e.code().name}: {e.details()}")

    worker = threading.Thread(target=call_with_old_key)
    worker.start()
    try:
        assert "kid" in refused(jwt_greeter, new_token).details()
        write_jwks(jwt_greeter.jwks, [old, new, *others])
        wait_until(lambda: accepted(jwt_greeter, new_token), "the new key verifies")
        # A file that does not parse keeps the keys in force: once the server has tried it (its
        # failure counted), the keys still verify.
        failed = scrape(jwt_greeter).get(jwks_reloads("failure"), 0)
        jwt_greeter.jwks.write_text('{"keys": [')
        wait_until(lambda: scrape(jwt_greeter).get(jwks_reloads("failure"), 0) > failed,
                   "the broken file is tried and refused")
        assert say_hello(jwt_greeter, new_token) == "Hello, you!"
        succeeded = scrape(jwt_greeter)[jwks_reloads("success")]
        write_jwks(jwt_greeter.jwks, [old, new, *others])
        wait_until(lambda: scrape(jwt_greeter)[jwks_reloads("success")] > succeeded,
                   "the repaired file is loaded")
    finally:
        stop.set()
        worker.join(timeout=RPC_TIMEOUT * 2)
    assert not failures, failures[:5]
    assert calls[0] > 0
    write_jwks(jwt_greeter.jwks, [new, *others])
    wait_until(lambda: not accepted(jwt_greeter, old_token), "the removed key stops verifying")
    assert "kid" in refused(jwt_greeter, old_token).details()
    assert say_hello(jwt_greeter, new_token) == "Hello, you!"
    write_jwks(jwt_greeter.jwks, signers.values())
    wait_until(lambda: accepted(jwt_greeter, old_token), "the original set is back")
    metrics = scrape(jwt_greeter)
    assert metrics[jwks_reloads("failure")] >= 1
    assert metrics[jwks_reloads("success")] >= 3
    assert metrics['greeter_auth_failures_total{reason="invalid_jwt"}'] >= 2


def test_deleted_jwks_revokes_its_keys(jwt_greeter, signers):
    """Deleting the file is how to revoke an issuer at once; the file back, its tokens work again."""
    token = signers["EdDSA"].token()
    assert say_hello(jwt_greeter, token) == "Hello, you!"
    jwt_greeter.jwks.unlink()
    try:
        wait_until(lambda: not accepted(jwt_greeter, token), "the deleted set is revoked")
        assert "kid" in refused(jwt_greeter, token).details()
    finally:
        write_jwks(jwt_greeter.jwks, signers.values())
    wait_until(lambda: accepted(jwt_greeter, token), "the set is back")
    assert scrape(jwt_greeter)[jwks_reloads("revoked")] >= 1


@pytest.mark.parametrize("jwks, audiences, expected", [
    ('{"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}', '["greeter"]',
     'key "h": symmetric ("kty": "oct") keys are refused'),
    ('{"keys": [', '["greeter"]', "not a JWKS"),
    ('{"keys": []}', "[]", "auth.jwt.issuers[0].audiences must list at least one"),
])
def test_config_check_names_the_key_and_the_file(tmp_path, jwks, audiences, expected):
    (tmp_path / "jwks.json").write_text(jwks)
    (tmp_path / "tokens.toml").write_text("")
    config = tmp_path / "greeter.toml"
    config.write_text(
        '[auth]\nenabled = true\ntokens_file = "tokens.toml"\n'
        f'[[auth.jwt.issuers]]\nissuer = {toml_str(ISSUER)}\njwks_file = "jwks.json"\n'
        f"audiences = {audiences}\n")
    res = greeter_cli("config", "check", "--config", config, cwd=tmp_path, check=False)
    assert res.returncode != 0, res.stdout
    assert expected in res.stderr, res.stderr
    named = "jwks.json" if audiences != "[]" else str(config.name)
    assert named in res.stderr, res.stderr


def jwks_reloads(outcome):
    """The series counting reloads of ISSUER's JWKS file with `outcome`."""
    return f'greeter_reloads_total{{kind="jwks",issuer="{ISSUER}",outcome="{outcome}"}}'


def scrape(server):
    """The server's /metrics, as {series: value}."""
    assert server.metrics_addr, "the server's metrics listener (conftest's GreeterProcess)"
    with urllib.request.urlopen(f"http://{server.metrics_addr}/metrics", timeout=RPC_TIMEOUT) as r:
        lines = r.read().decode().splitlines()
    return {series: float(value) for series, value in
            (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))}


def accepted(server, token):
    try:
        return say_hello(server, token) == "Hello, you!"
    except grpc.RpcError:
        return False


def wait_until(condition, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.05)
