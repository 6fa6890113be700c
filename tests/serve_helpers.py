"""Shared pieces of the service tests: ONE tiny trained model directory per session (copied per test), tokens,
a real uvicorn subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from privrec.cli import main
from privrec.commands.serve import run_token_create

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["--set", "train.epochs=1", "--set", "model.precision=fp32", "--set", "eval.zero_shot=false"]


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> Path:
    """A tiny single model (retrain-all), trained once."""
    out = tmp_path_factory.mktemp("serve") / "model"
    assert main(["--no-progress", "train", TINY, "--out", str(out), *FAST]) == 0
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def victim_of(model: Path) -> int:
    """The user with the most training samples (forgetting them retrains the adapter)."""
    from privrec.model.adapters import read_meta

    ids = read_meta(model / "adapters" / "default")["sample_ids"]
    users = [int(i.split("-")[0][1:]) for i in ids]
    return max(set(users), key=lambda u: (users.count(u), -u))


def tokens(model: Path, *users: int) -> dict:
    """{"admin": token, user: token, ...}"""
    out = {"admin": run_token_create(model, None)[0]}
    for u in users:
        out[u] = run_token_create(model, u)[0]
    return out


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(tmp_path: Path) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                PRIVREC_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")


class Server:
    """``privrec serve MODEL`` in a subprocess, on a free loopback port."""

    def __init__(self, model: Path, tmp_path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / f"serve-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "privrec.cli", "--no-progress", "serve", str(model), "--port", str(self.port),
             *args], env=env(tmp_path), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-3000:]
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("privrec serve did not come up: " + Path(self.log.name).read_text()[-3000:])

    def kill9(self) -> None:
        self.proc.kill()  # SIGKILL
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.log.close()


def wait_done(get, rid: str, timeout: float = 300) -> dict:
    """Poll GET /v1/requests/{rid} until done."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = get(f"/v1/requests/{rid}")
        assert r.status_code == 200, r.text
        if r.json()["status"] == "done":
            return r.json()
        assert not r.json().get("error"), r.json()
        time.sleep(0.2)
    raise AssertionError(f"request {rid} not done in {timeout}s")
