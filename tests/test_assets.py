"""Assets: fetched once, verified, and a clear error when the registry is out of reach."""

from __future__ import annotations

import subprocess

import pytest

from privrec import assets
from privrec.errors import AssetError


def test_fetch_is_idempotent(monkeypatch):
    """Once both assets are home (fetched here through the project's own code when the home is empty, as in
    CI), asking again touches no registry and returns the same folders."""
    first = assets.fetch_all()
    assert (first["ml-100k"] / "ml-100k.inter").is_file()
    assert (first[assets.DEFAULT_MODEL] / "model.safetensors").is_file()

    def no_network(*a, **k):
        raise AssertionError("fetched twice")
    monkeypatch.setattr(subprocess, "run", no_network)
    assert assets.fetch_all() == first


def test_unreachable_registry_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: Could not find a version that satisfies the requirement recbole==1.2.1"))
    with pytest.raises(AssetError) as e:
        assets.fetch_movielens()
    msg = str(e.value)
    assert "recbole==1.2.1" in msg and "data.path" in msg and "\n" not in msg
    assert not (tmp_path / "data" / "ml-100k").exists()


def test_hash_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVREC_HOME", str(tmp_path))
    wheel = assets.Wheel("recbole", "1.2.1", "recbole-1.2.1-py3-none-any.whl", "0" * 64)

    def fake_download(cmd, **k):
        dest = cmd[cmd.index("-d") + 1]
        (__import__("pathlib").Path(dest) / wheel.filename).write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(subprocess, "run", fake_download)
    with pytest.raises(AssetError, match="does not match"):
        assets.fetch_wheel(wheel)
    assert not (tmp_path / "wheels" / wheel.filename).exists()
