"""External commands (Source Extractor, SCAMP, MissFITS, SWarp, imhead, hotpants).

Always an argument list, never a shell string; always a timeout; the error names the tool,
the exit code and the tail of its output.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

#: Debian's binary names first, upstream names as fall-backs.
BINARIES = {
    "sextractor": ["source-extractor", "sex"],
    "scamp": ["scamp"],
    "missfits": ["missfits"],
    "swarp": ["SWarp", "swarp"],
    "imhead": ["imhead"],
    "hotpants": ["hotpants"],
}


class ToolError(RuntimeError):
    def __init__(self, tool: str, reason: str):
        self.tool = tool
        super().__init__(f"{tool}: {reason}")


def which(tool: str) -> str | None:
    """Absolute path of a tool by its logical name (``sextractor``, ``swarp``...)."""
    for name in BINARIES.get(tool, [tool]):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def run_tool(tool: str, args: list[str], cwd: str | Path | None = None, timeout: float = 600.0,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``tool`` with ``args``; raise :class:`ToolError` on a missing binary, a timeout or
    a non-zero exit code."""
    exe = which(tool)
    if exe is None:
        raise ToolError(tool, "binary not found on PATH")
    cmd = [exe, *[str(a) for a in args]]
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise ToolError(tool, f"timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-1500:]
        raise ToolError(tool, f"exit code {proc.returncode}: {tail}")
    return proc
