"""benches/compare as a package: greeter against its peers, one command, one table.

benches/compare (a shell script) makes sure the project venv exists and runs `python -m comparison`
with this package's parent on PYTHONPATH. The parts:

  main    the command line, the measurement rounds, the summary printed and written as JSON
  host    facts about this machine and its processes (/proc), CPU pinning, fd limits, apt, logging
  peers   the servers compared: how each is configured, started, probed for readiness and stopped
  build   building the peers' binaries: greeter and bare tonic (cargo), Python, grpc-go
  load    the two load generators: `greeter bench` and h2load
  idle    the idle HTTP/2 connection holder (a child process) and the RSS it costs a server
  sink    the OTLP trace sink the tracing peers export to (a child process)
  report  medians, the two tables, the targets of issues 8 and 4

The paths below are shared by all of them.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
VENV_PY = ROOT / ".tools" / "venv" / "bin" / "python"
TOOLS = ROOT / ".tools"
