"""A scale-out deployment of real processes on loopback, for the tests: `idvault serve`
API nodes and `idvault worker` Celery workers over the local Redis and PostgreSQL.

An API node can be started *without the ML stack*: a ``sitecustomize`` on its path
refuses every import of torch, diffusers, transformers, insightface, onnxruntime, onnx,
OpenCV, accelerate and peft -- what ``pip install idvault`` without the ``ml`` extra
lacks -- and records each attempt in a file the test reads.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ML_STACK = ("torch", "diffusers", "transformers", "insightface", "onnxruntime", "onnx",
            "cv2", "accelerate", "peft")
_BLOCKER = '''
import importlib.abc, os, sys

BLOCKED = set({blocked!r})
LOG = os.environ["IDVAULT_TEST_IMPORT_LOG"]


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(LOG, "a") as f:
                f.write(name + "\\n")
            raise ImportError(f"{{name}}: not installed on this API node (no 'ml' extra)")
        return None


sys.meta_path.insert(0, _NotInstalled())
'''


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n"
                                   f"{self.text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: no {pattern!r} in {timeout} s:\n{self.text()[-3000:]}")

    def children(self) -> list[int]:
        """The pool processes of a worker (its direct children)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.pid)],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@dataclass
class Server(Proc):
    url: str = ""
    env: dict = field(default_factory=dict)

    def get(self, path: str, key: str, **kw) -> requests.Response:
        return requests.get(self.url + path, headers={"Authorization": f"Bearer {key}"},
                            timeout=30, **kw)

    def post(self, path: str, key: str, **kw) -> requests.Response:
        return requests.post(self.url + path, headers={"Authorization": f"Bearer {key}"},
                             timeout=60, **kw)

    def delete(self, path: str, key: str, **kw) -> requests.Response:
        return requests.delete(self.url + path, headers={"Authorization": f"Bearer {key}"},
                               timeout=60, **kw)


@dataclass
class Deployment:
    root: Path
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen,
                                                                             Path]:
        log = self.root / f"{name}.log"
        out = open(log, "w")  # noqa: SIM115 - the process writes it until it ends
        popen = subprocess.Popen([sys.executable, "-m", "web.cli.main", *args], env=env,
                                 stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                 start_new_session=True)
        return popen, log

    def serve(self, name: str, *, ml: bool = True) -> Server:
        env = dict(self.env)
        if not ml:
            blocker = self.root / f"{name}-site"
            blocker.mkdir(exist_ok=True)
            (blocker / "sitecustomize.py").write_text(_BLOCKER.format(blocked=ML_STACK))
            env["PYTHONPATH"] = os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")])
            env["IDVAULT_TEST_IMPORT_LOG"] = str(self.root / f"{name}-imports.log")
            Path(env["IDVAULT_TEST_IMPORT_LOG"]).write_text("")
        popen, log = self._start(name, ["serve", "--port", "0", "--threads", "8"], env)
        server = Server(name, popen, log, env=env)
        self.procs.append(server)
        server.url = server.wait_for(r"serving on (http://127\.0\.0\.1:\d+)/", 60).group(1)
        return server

    def imports_refused(self, server: Server) -> list[str]:
        return (self.root / f"{server.name}-imports.log").read_text().split()

    def worker(self, name: str, *, queues: str = "gpu,cpu", warm: bool = True,
               env: dict[str, str] | None = None) -> Proc:
        args = ["worker", "--queues", queues, "--concurrency", "1", "--loglevel", "INFO"]
        popen, log = self._start(name, args + (["--warm"] if warm else []),
                                 {**self.env, **(env or {})})
        worker = Proc(name, popen, log)
        self.procs.append(worker)
        worker.wait_for(r"idvault worker ready", 90)
        if warm:
            worker.wait_for(r"warm: face models", 90)
        return worker

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
