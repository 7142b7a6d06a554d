"""deploy/README.md's commands for certificates, tokens and checking health, run in the order the
page gives them, against a local greeter set up as production is (TLS, token auth on the default
policy, a plaintext probe listener), so that the page's examples work with the tokens it creates.

kubectl lines are skipped (no cluster here): the harness plays the cluster's part by serving the
certificate and tokens files the page's commands wrote, on swapped ports (50051 and 8081 become
free ports).
"""

import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import (ROOT, SUBPROCESS_TIMEOUT, GreeterProcess, toml_str, two_free_ports,
                      require_greeter_bin)

DEPLOY_README = ROOT / "deploy" / "README.md"


def section(text, title):
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"deploy/README.md has no section '## {title}'"
    return match.group(1)


def commands(block):
    """The block's commands, continuation lines joined; kubectl commands and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "kubectl "))]


def sh_blocks(text):
    return re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)


def test_secrets_and_health_commands_work_in_order(tmp_path, grpcurl):
    text = DEPLOY_README.read_text()
    secrets = sh_blocks(section(text, "Secrets"))
    health = sh_blocks(section(text, "Check health"))
    assert len(secrets) == 3 and len(health) == 1, (len(secrets), len(health))
    # Everything the prod overlay's pods mount exists before the page applies it: followed in
    # order, no pod waits in ContainerCreating for a ConfigMap a later section creates.
    jwks = text.index("create configmap greeter-jwks")
    apply = text.index("kubectl apply -k deploy/k8s/overlays/prod\n")
    assert jwks < apply, "the JWKS ConfigMap is created after the overlay is applied"
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", work / "proto")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "greeter").symlink_to(require_greeter_bin())
    (bin_dir / "grpcurl").symlink_to(grpcurl)
    port, probe_port = map(str, two_free_ports())
    swap = lambda s: s.replace("50051", port).replace("8081", probe_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREETER")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"

    def run(lines, name):
        script = "set -euo pipefail\n" + "\n".join(swap(line) for line in lines)
        res = subprocess.run(["bash", "-c", script], cwd=work, env=env, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert res.returncode == 0, f"{name}:\n{script}\nexit {res.returncode}\n{res.stdout}{res.stderr}"
        return res.stdout

    def run_async(lines):
        script = "set -euo pipefail\n" + "\n".join(swap(line) for line in lines)
        return subprocess.Popen(["bash", "-c", script], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def wait_until(done, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
            time.sleep(0.02)

    # Certificates and tokens as the page makes them; the tokens stay in the shell's variables,
    # so the health block runs in the same script.
    setup = commands(secrets[0]) + commands(secrets[1])
    assert any(line.startswith("greeter certs generate") for line in setup), setup
    assert any("ONCALL=" in line for line in setup), setup
    run([line for line in setup if not line.startswith(("TOKEN=", "ONCALL="))], "certificates")

    # The cluster's part: a production-like server on the files the page wrote.
    (work / "tokens.toml").write_text("")
    config = work / "server.toml"
    config.write_text(
        "[tls]\nenabled = true\n"
        f"cert = {toml_str(work / 'certs' / 'server.pem')}\nkey = {toml_str(work / 'certs' / 'server.key')}\n"
        f"[auth]\nenabled = true\ntokens_file = {toml_str(work / 'tokens.toml')}\nreload_interval = \"50ms\"\n"
        f"[probe]\nlisten = \"127.0.0.1:{probe_port}\"\n")
    server = GreeterProcess(tmp_path / "server", config=config, port=int(port),
                            health_addr=f"127.0.0.1:{probe_port}")
    try:
        checks = commands(health[0])
        tokens = [line for line in setup if line.startswith(("TOKEN=", "ONCALL="))]
        # The tokens live in the script's variables, so one script appends them and runs the
        # checks; between the two it waits until the server has reloaded tokens.toml with all of
        # them (its "reloaded" line), which the harness tells it by creating a file.
        appended, reloaded = work / ".appended", work / ".reloaded"
        handshake = [f"touch {appended}",
                     f"while [ ! -e {reloaded} ]; do sleep 0.02; done"]
        script = run_async(tokens + handshake + checks)
        try:
            wait_until(lambda: appended.exists() or script.poll() is not None,
                       "the tokens appended")
            wait_until(lambda: any("reloaded" in line and f"{len(tokens)} tokens" in line
                                   for line in server.stderr_path.read_text().splitlines()),
                       f"tokens.toml reloaded with {len(tokens)} tokens")
            reloaded.touch()
            out, err = script.communicate(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if script.poll() is None:
                script.kill()
                script.communicate()
        assert script.returncode == 0, f"check health: exit {script.returncode}\n{out}{err}"
    finally:
        server.stop()
    assert out.count("SERVING\n") >= 2, out
    assert "Hello, you!\n" in out, out
    assert '"status": "SERVING"' in out, out
    assert out.count('"message": "Hello, you!"') == 2, out
