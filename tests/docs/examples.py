"""The fenced examples of the README and the documentation pages, and how each runs here.

Every ``bash`` or ``python`` block carries a mark on the line before it:

- ``<!-- run -->``: a test runs it, in a workspace holding tiny stand-ins for what the page names;
- ``<!-- file: NAME -->``: (any language) the block is written to NAME in the workspace first;
- ``<!-- not run: REASON -->``: it cannot run here (several machines, a cluster, ``make`` itself).

Full-size runs become tiny ones by the rules of ``tiny_train`` (2 steps, the tiny preset, no tracking); hub
ids and placeholders become local stand-ins by ``Workspace.replacements``. Nothing else is changed.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARK = re.compile(r"<!--\s*(run|file:\s*(?P<file>\S+)|not run:\s*(?P<reason>.+?))\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
EXAMPLE_LANGUAGES = {"bash", "sh", "shell", "console", "python", "py"}


@dataclass
class Block:
    page: str
    line: int
    lang: str
    text: str
    mark: str | None  # "run", "file", "not run" or None
    detail: str = ""  # the file name or the reason

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[str]:
    return ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))


def blocks(page: str) -> list[Block]:
    lines = (ROOT / page).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.fullmatch(before.strip())
        kind = detail = None
        if mark:
            kind = "file" if mark["file"] else "not run" if mark["reason"] else "run"
            detail = mark["file"] or mark["reason"] or ""
        found.append(Block(page, i + 1, opening[1], "\n".join(lines[i + 1:end]) + "\n", kind, detail or ""))
        i = end + 1
    return found


def commands(text: str) -> list[str]:
    """A shell block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = text.replace("\\\n", " ")
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def tiny_train(argv: list[str]) -> list[str]:
    """``train`` arguments shrunk to a run of seconds: 2 steps, batches of 4, no tracking; the tiny preset
    for a scratch model (a pretrained-parts run keeps `llava`, with texts cut to 160 tokens)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--max-steps":
            i += 2
            continue
        if argv[i] == "--preset" and argv[i + 1] != "llava":
            i += 2
            continue
        out.append(argv[i])
        i += 1
    if "--preset" not in out and "--from" not in out and "--resume" not in out:
        out += ["--preset", "tiny"]
    if "--preset" in out and out[out.index("--preset") + 1] == "llava":
        out += ["--set", "decoder.max_text_len=160"]
    if "--resume" not in out:
        out += ["--max-steps", "2", "--set", "train.batch_size=4", "--set", "train.val_generate=2"]
    if "--tracking-uri" not in out:
        out += ["--no-tracking"]
    return out


@dataclass
class Workspace:
    """One page's folder of stand-ins, with what its examples started (a server) and printed."""
    path: Path
    replacements: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    server: subprocess.Popen | None = None
    output: list[str] = field(default_factory=list)

    def substituted(self, text: str) -> str:
        for name, local in self.replacements.items():
            text = text.replace(name, local)
        return text

    def run(self, block: Block) -> None:
        if block.mark == "file":
            (self.path / block.detail).write_text(block.text)
        elif block.lang in ("python", "py"):
            self.run_python(block)
        else:
            for command in commands(block.text):
                self.run_command(block, command)

    def run_python(self, block: Block) -> None:
        printed = io.StringIO()
        cwd = Path.cwd()
        os.chdir(self.path)
        try:
            with redirect_stdout(printed):
                exec(compile(self.substituted(block.text), block.where, "exec"), {"__name__": "__docs__"})
        finally:
            os.chdir(cwd)
        self.output.append(printed.getvalue())

    def run_command(self, block: Block, command: str) -> None:
        argv = shlex.split(self.substituted(command), comments=True)
        env = dict(self.env)
        while "=" in argv[0] and not argv[0].startswith("-"):
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
        if argv[0] == "moevlm" and argv[1] == "serve":
            return self.start_server(block, argv[1:])
        if argv[0] == "moevlm":
            return self.run_moevlm(block, command, argv[1:])
        if argv[0] == "torchrun":
            ranks = {"--nproc_per_node=4": "--nproc_per_node=2", "--nproc_per_node=2": "--nproc_per_node=1"}
            argv = [ranks.get(a, a) for a in argv]
            split = argv.index("-m") + 2
            train = argv[split:]
            argv = [sys.executable, "-m", "torch.distributed.run", "--master-port", str(free_port()),
                    *argv[1:split], *(tiny_train(train) if train[0] == "train" else train)]
        elif argv[0] == "python":
            argv = [sys.executable, *[str(ROOT / a) if a.startswith("benchmarks/") else a for a in argv[1:]]]
        else:
            raise AssertionError(f"{block.where}: no rule to run {command!r} here")
        result = subprocess.run(argv, cwd=self.path, env={**os.environ, **env, "PYTHONPATH": str(ROOT / "src")},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{block.where}: {command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        self.output.append(result.stdout)

    def run_moevlm(self, block: Block, command: str, argv: list[str]) -> None:
        from moevlm.cli import main

        if argv[0] == "train" and "--help-config" not in argv:
            argv = tiny_train(argv)
        printed = io.StringIO()
        cwd = Path.cwd()
        os.chdir(self.path)
        try:
            with redirect_stdout(printed):
                code = main(argv)
        except SystemExit as exit_:  # --help-config, like --help
            code = exit_.code
        finally:
            os.chdir(cwd)
        assert code in (0, None), f"{block.where}: {command} exited {code}"
        self.output.append(printed.getvalue())

    def start_server(self, block: Block, argv: list[str]) -> None:
        port = free_port()
        self.replacements["http://127.0.0.1:8000"] = f"http://127.0.0.1:{port}"
        self.server = subprocess.Popen([sys.executable, "-m", "moevlm", *argv, "--port", str(port)], cwd=self.path,
                                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300  # the server compiles its decoding step first
        while time.monotonic() < deadline:
            assert self.server.poll() is None, f"{block.where}: the server exited: {self.server.stderr.read()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"{block.where}: the server was not up within 120 s")

    def close(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(timeout=30)
            self.server = None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
