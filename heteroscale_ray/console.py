"""What the CLI's console shows: our own lines; every library's log records go to a file, and their errors are
surfaced on the console too (one line each, with the file to read).

Ray, ray.llm and vLLM install console handlers of their own (ray.llm a JSON one at INFO on the root logger);
`route_library_logs()` moves those loggers onto the root handlers set up here, so a user sees progress lines,
not Triton notes or deployment options as JSON. Imports nothing of Ray or vLLM.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

OURS = ("heteroscale_ray", "serving", "autoscaler", "placement", "bench", "common", "__main__")
LIBRARIES = ("ray", "ray.serve", "ray.llm", "ray.data", "vllm", "httpx", "urllib3", "filelock", "asyncio")


def log_path() -> Path:
    return Path(os.environ.get("HETEROSCALE_LOG_DIR") or Path.home() / ".cache" / "heteroscale" / "logs") / "cli.log"


class _ConsoleFilter(logging.Filter):
    """Our records at the console's level; a library's only from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "root" or record.name.split(".")[0] in OURS
        return ours or record.levelno >= logging.ERROR


def setup(verbose: bool = False) -> Path | None:
    """Console: ours at WARNING (INFO with -v), libraries' errors; file: everything at INFO. Returns the file,
    or None when it cannot be written (then libraries' records below ERROR are dropped, never printed)."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.addFilter(_ConsoleFilter())
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    path = log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(path)
    except OSError:
        return None
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(to_file)
    return path


def route_library_logs() -> None:
    """Take the console handlers that Ray, ray.llm and vLLM attached to their loggers (and ray.llm to the root)
    and send those loggers' records through the root handlers of `setup()` instead."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, logging.FileHandler) or
            any(isinstance(f, _ConsoleFilter) for f in h.filters)]
    if not ours:
        return  # setup() was not called (a library user): leave their logging alone
    for handler in root.handlers[:]:
        if handler not in ours:
            root.removeHandler(handler)
    root.setLevel(logging.INFO)
    for name in [*LIBRARIES, *(n for n in list(logging.root.manager.loggerDict) if n.startswith(("ray.", "vllm.")))]:
        logger = logging.getLogger(name)
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
        logger.propagate = True
