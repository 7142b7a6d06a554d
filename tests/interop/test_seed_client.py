"""(a) The gRPC Python quick start client, unchanged but for its target, against greeter."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import SUBPROCESS_TIMEOUT

CLIENT = Path(__file__).resolve().parent / "greeter_client.py"


def test_quickstart_greeter_client(greeter, stubs_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=stubs_dir)
    env.pop("GREETER_TARGET", None)
    res = subprocess.run([sys.executable, str(CLIENT), f"localhost:{greeter.port}"],
                         cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, f"client exited {res.returncode}:\n{res.stdout}{res.stderr}"
    assert res.stdout.splitlines() == [
        "Will try to greet world ...",
        "Greeter client received: Hello, you!",
        "Greeter client received: Hello again, you!",
    ], res.stdout + res.stderr
