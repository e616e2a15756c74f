"""No external command is built from a shell string, anywhere in the repository's Python code.

Every tracked ``*.py`` file is parsed (AST, so strings and comments do not count) and every call
is checked: no ``shell=True`` (subprocess, asyncio), no ``os.system`` / ``os.popen`` /
``os.exec*p*`` with a string, no ``subprocess.getoutput`` / ``getstatusoutput``, no
``asyncio.create_subprocess_shell``, and no subprocess call whose command is a single string
(a string is parsed by a shell, or taken as one program name). The shell scripts of the
deployment take their inputs as quoted variables (checked for ``eval``).
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS = {"run", "Popen", "call", "check_call", "check_output"}
FORBIDDEN = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
             ("asyncio", "create_subprocess_shell"), ("os", "popen2"), ("os", "popen3"), ("commands", "getoutput")}


def _dotted(node: ast.AST) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)) or (
        isinstance(node, ast.BinOp) and (_is_text(node.left) or _is_text(node.right)))


def problems_in(source: str, name: str) -> list[str]:
    out = []
    tree = ast.parse(source, name)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{name}:{node.lineno}"
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                out.append(f"{where}: shell={ast.unparse(kw.value)}")
        func = _dotted(node.func)
        if func in FORBIDDEN:
            out.append(f"{where}: {func[0]}.{func[1]}()")
        if func and func[0] == "subprocess" and func[1] in SUBPROCESS and node.args and _is_text(node.args[0]):
            out.append(f"{where}: subprocess.{func[1]} with a command string")
        if isinstance(node.func, ast.Name) and node.func.id in ("system", "popen"):
            out.append(f"{where}: {node.func.id}()")
    return out


def test_the_check_catches_shell_strings():
    bad = ("import os, subprocess, asyncio\nsubprocess.run('ls ' + x, shell=True)\nos.system(f'rm {p}')\n"
           "os.popen('id')\nsubprocess.check_output(f'sextractor {img}')\nsubprocess.getoutput('id')\n"
           "asyncio.create_subprocess_shell(cmd)\nsubprocess.Popen(cmd, shell=flag)\n")
    assert len(problems_in(bad, "bad.py")) == 8
    good = ("import subprocess\nsubprocess.run(['ls', x], check=True)\nsubprocess.Popen([exe, *args], shell=False)\n"
            "s = 'shell=True os.system'\n")
    assert problems_in(good, "good.py") == []


def test_no_external_command_from_a_shell_string():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True)
    names = [n for n in files.stdout.split() if (REPO / n).is_file()]
    assert len(names) > 100
    found = []
    for name in names:
        found += problems_in((REPO / name).read_text(), name)
    assert not found, found


def test_the_deployment_scripts_do_not_eval_their_inputs():
    """``eval`` only of a repository script whose output is shell-quoted (``printf %q``)."""
    files = subprocess.run(["git", "ls-files", "*.sh"], cwd=REPO, capture_output=True, text=True, check=True)
    names = files.stdout.split()
    assert "deploy/nats/entrypoint.sh" in names
    for name in names:
        text = (REPO / name).read_text()
        for m in re.finditer(r"(?:^|[;&|\s])eval\s+(.*)$", text, re.M):
            src = re.fullmatch(r'"\$\(([\w./-]+\.sh)\)"', m.group(1).strip())
            assert src, (name, m.group(0))
            producer = (REPO / src.group(1)).read_text()
            assert "%q" in producer and not re.search(r"echo\s+\"?\$", producer), (name, src.group(1))
        assert not re.search(r"\b(?:ba)?sh -c\s+\"?\$", text), name
