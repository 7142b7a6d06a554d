"""The server process: becomes SERVING on its own port and exits 0 on SIGTERM."""

from conftest import STOP_TIMEOUT, GreeterProcess


def test_sigterm_stops_server(tmp_path):
    server = GreeterProcess(tmp_path)  # fails the test unless it becomes SERVING
    assert server.proc.poll() is None, "greeter exited on its own before SIGTERM"
    stopped = server.stop()
    assert stopped, f"greeter still running {STOP_TIMEOUT:.0f} s after SIGTERM (was killed)"
    # Exit 0 from its own shutdown, not death by the signal (-15) or a failure.
    assert server.proc.returncode == 0, server.proc.returncode
    assert '"signal":"SIGTERM"' in server.stderr_path.read_text(), server.stderr_path.read_text()
