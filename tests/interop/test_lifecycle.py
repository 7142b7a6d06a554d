"""The server process: becomes SERVING on its own port and exits on SIGTERM."""

from conftest import STOP_TIMEOUT, GreeterProcess


def test_sigterm_stops_server(tmp_path):
    server = GreeterProcess(tmp_path)  # fails the test unless it becomes SERVING
    stopped = server.stop()
    assert stopped, f"greeter still running {STOP_TIMEOUT:.0f} s after SIGTERM (was killed)"
