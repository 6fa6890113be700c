"""A tiny single model's erasure certificate, pinned (issue 30: the forgetting engine moved out of
``commands/`` and every certificate body stays what it was). Its tensor hashes depend on the machine's kernels,
so they are named by identity; the request id is random; everything else (the removed interactions and
samples, the lineage, the run record) must match byte for byte."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from privrec.cli import main
from privrec.unlearning.exact.certificate import canonical_sha256

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
PINNED = "af4620e6beb9abd89cc6b3e2bf404895e204acb7485d00b384a409f7fda3bcd7"  # computed at 88f629d, before the move


def normalised(body: dict) -> dict:
    names: dict[str, str] = {}

    def name(h):
        return None if h is None else names.setdefault(h, f"tensors-{len(names)}")

    adapters = [dict(a, before=name(a["before"]), after=name(a["after"])) for a in body["adapters"]]
    return dict(body, adapters=adapters, request=dict(body["request"], id="REQUEST"))


def test_a_tiny_single_models_certificate_body_is_what_it_was(tmp_path):
    out = tmp_path / "single"
    assert main(["--no-progress", "train", TINY, "--out", str(out), "--set", "train.epochs=1", "--set",
                 "model.precision=fp32", "--set", "eval.zero_shot=false"]) == 0
    ids = json.loads((out / "model.json").read_text())["adapters"][0]["sample_ids"]
    users = Counter(int(i[1:].split("-")[0]) for i in ids)
    victim = max(users, key=lambda u: (users[u], -u))
    assert main(["--no-progress", "forget", str(out), "--users", str(victim)]) == 0
    [cert] = (out / "certificates").glob("*.json")
    body = normalised(json.loads(cert.read_text())["body"])
    assert canonical_sha256(body) == PINNED, json.dumps(body, indent=1)[:3000]
