"""Every CLI command given an unreachable endpoint, a missing file or a stopped cluster exits non-zero with one
line that says what and where (no traceback). Runs the installed `heteroscale` as a user would."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


HETEROSCALE = str(Path(sys.executable).with_name("heteroscale"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT = closed_port()
MISSING = "/nonexistent/heteroscale-missing"


def cases(tmp: Path) -> list[tuple[list[str], int, str]]:
    trace = tmp / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5}\n')
    url = f"http://127.0.0.1:{PORT}"
    gcs = ["--address", f"127.0.0.1:{PORT}"]
    return [
        (["bench", "--url", url, "--trace", str(trace), "--out", str(tmp / "b")], 1, f"cannot reach {url}"),
        (["bench", "--url", url, "--trace", MISSING + ".jsonl", "--out", str(tmp / "b")], 2, MISSING),
        (["profile", "--url", url, "--rates", "1", "--out", str(tmp / "p")], 1, f"cannot reach {url}"),
        (["sim", "--scenario", MISSING + ".yaml", "--out", str(tmp / "s")], 2, MISSING),
        (["trace", MISSING + ".csv", str(tmp / "o.jsonl")], 2, MISSING),
        (["validate", "--cluster", MISSING + ".yaml"], 2, MISSING),
        (["validate", "--service", MISSING + ".yaml"], 2, MISSING),
        (["status", *gcs], 1, f"127.0.0.1:{PORT}"),
        (["deploy", *gcs], 1, f"127.0.0.1:{PORT}"),
        (["undeploy", *gcs], 1, f"127.0.0.1:{PORT}"),
        (["up", "--cluster", MISSING + ".yaml"], 2, MISSING),
    ]


def test_each_command_fails_in_one_line_naming_what_and_where(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HETEROSCALE_LOG_DIR": str(tmp_path / "logs")}
    seen = []
    for argv, code, where in cases(tmp_path):
        out = subprocess.run([HETEROSCALE, *argv], capture_output=True, text=True, timeout=90, env=env)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == code, (argv, out.returncode, out.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and where in lines[0], (argv, out.stderr[-2000:])
        assert "Traceback" not in out.stdout + out.stderr
        seen.append(argv[0])
    assert len(seen) == 11
