"""README.md's front door, run as written: the Quick start's commands and the Secured section's
script, in a scratch copy of what they need (proto/, the two quick start clients), against the
built binary, so that the page a new user follows first cannot drift from what works.

What the harness does for the reader: `greeter`, `grpcurl` and `python` (the test venv, which
has grpcio and grpcio-tools) are first on PATH; `cargo install` and `pip install` lines are
skipped (the binary and the packages are already there); the quick start's server runs in the
background while the transcripts run, and is stopped before the Secured section, as the README
says; and a background `greeter serve ... &` gets the moment a person typing the next command
would give it. The ports are swapped: 50051 becomes a free port, in the commands, in what they
print, and through GREETER__SERVER__LISTEN / GREETER_ADDR / GREETER_TARGET for the defaults.

Transcript blocks (lines starting with `$ `) are compared line by line with what each command
prints; a `...` line matches the rest of the output.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SUBPROCESS_TIMEOUT, READY_TIMEOUT, free_port, require_greeter_bin

README = ROOT / "README.md"
DOC_PORT = "50051"
# The second server of the Secured section's workload-identity block.
JWT_DOC_PORT = "50052"


def section(text, title):
    """The text of the `## title` section, its subsections included."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {title}'"
    return match.group(1)


def sh_blocks(text):
    return re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)


def transcript(block):
    """[(command, expected output lines)] of a block of `$ ` lines; continuation lines (a
    trailing backslash) belong to their command."""
    steps = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        assert line.startswith("$ "), f"not a command or its output: {line!r}"
        command = line[2:]
        while command.endswith("\\"):
            i += 1
            command += "\n" + lines[i]
        i += 1
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        steps.append((command, output))
    return steps


def skipped(command):
    """Installation lines: what they install is already here."""
    return command.startswith("cargo install ") or re.match(r"python -m pip install ", command)


def wait_for_port(port, timeout=READY_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listens on 127.0.0.1:{port}"
        time.sleep(0.05)


@pytest.fixture
def front_door(tmp_path, grpcurl):
    """A scratch copy of the repository's parts the README uses, a PATH with the tools, and the
    environment that swaps the port."""
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", work / "proto")
    (work / "tests" / "interop").mkdir(parents=True)
    for client in ("greeter_client.py", "greeter_client_secure.py"):
        shutil.copy(ROOT / "tests" / "interop" / client, work / "tests" / "interop" / client)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "greeter").symlink_to(require_greeter_bin())
    (bin_dir / "grpcurl").symlink_to(grpcurl)
    # A wrapper, not a symlink: a venv's python finds its packages from its own path.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    port = str(free_port())
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GREETER") and k not in ("PYTHONPATH", "RUST_LOG")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}",
               GREETER__SERVER__LISTEN=f"127.0.0.1:{port}", GREETER_ADDR=f"127.0.0.1:{port}",
               GREETER_TARGET=f"localhost:{port}")
    return work, env, port


def run(command, work, env):
    try:
        return subprocess.run(["bash", "-c", "set -euo pipefail\n" + command], cwd=work, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{command!r} still running after {SUBPROCESS_TIMEOUT:.0f} s:\n{e.stdout}{e.stderr}",
                    pytrace=False)


def matches(expected, actual):
    """Line by line; a `...` line matches whatever follows."""
    for i, line in enumerate(expected):
        if line == "...":
            return True
        if i >= len(actual) or actual[i] != line:
            return False
    return len(actual) == len(expected)


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_quick_start_then_secured_section_as_written(front_door, tmp_path):
    work, env, port = front_door
    text = README.read_text()
    quick = sh_blocks(section(text, "Quick start"))
    secured = sh_blocks(section(text, "Secured: TLS and tokens"))
    assert len(quick) >= 4 and len(secured) == 2, (len(quick), len(secured))
    swap = lambda s: s.replace(DOC_PORT, port)
    jwt_port = str(free_port())

    # The first block installs and starts the server; the others are transcripts against it.
    start = [line.split("#")[0].strip() for line in quick[0].splitlines()]
    start = [line for line in start if line and not skipped(line)]
    assert start == ["greeter serve"], start
    log = open(tmp_path / "quick-start-server.log", "w")
    server = subprocess.Popen(["bash", "-c", swap(start[0])], cwd=work, env=env,
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                              start_new_session=True)
    try:
        wait_for_port(int(port))
        steps = [step for block in quick[1:] for step in transcript(block)]
        assert any("greeter_client.py" in command for command, _ in steps), steps
        for command, expected in steps:
            if skipped(command):
                continue
            res = run(swap(command), work, env)
            assert res.returncode == 0, f"$ {command}\nexit {res.returncode}\n{res.stdout}{res.stderr}"
            expected = [swap(line) for line in expected]
            assert matches(expected, res.stdout.splitlines()), \
                f"$ {command}\nexpected:\n" + "\n".join(expected) + f"\ngot:\n{res.stdout}{res.stderr}"
    finally:
        stop(server)
        log.close()
    assert server.returncode == 0, (tmp_path / "quick-start-server.log").read_text()

    # The Secured section's script, once the quick start's server is stopped as the README says,
    # then its workload-identity block (a second server, on the README's second port) in the
    # same shell, as a reader would go on.
    script = []
    for line in swap(secured[0] + secured[1]).replace(JWT_DOC_PORT, jwt_port).splitlines():
        script.append(line)
        if re.match(r"greeter serve\b.*&\s*(#.*)?$", line):
            listens = re.search(r"--listen \S+:(\d+)", line)
            waited = listens.group(1) if listens else port
            script.append(f"until (exec 3<>/dev/tcp/127.0.0.1/{waited}) 2>/dev/null; do sleep 0.05; done")
    # Output to files: the server the script leaves in the background keeps its pipes open.
    out_path, err_path = tmp_path / "secured.stdout", tmp_path / "secured.stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + "\n".join(script)],
                                cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=SUBPROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        finally:
            # The script, if still running, and the server it started in the background.
            os.killpg(proc.pid, signal.SIGTERM)
    out, err = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}{err}"
    lines = out.splitlines()
    # Once with the static token, once with the minted JWT.
    assert lines.count("Hello, you!") == 2, out + err
    assert "helloworld.Greeter" in lines, out + err
    python = ["Will try to greet world ...", "Greeter client received: Hello, you!",
              "Greeter client received: Hello again, you!"]
    start = lines.index(python[0])
    assert lines[start:start + 3] == python, out + err
