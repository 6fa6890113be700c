"""A Flower deployment with client-local data on this machine's loopback (docs/federated.md).

    python flower/run_local.py CONFIG --out DIR [--set KEY=VALUE ...] [--client-data SPLIT] [--compare RUN]

Separate processes, as on separate machines:

1. ``privrec federate-split-data CONFIG --out DIR/clients`` (unless ``--client-data`` names such a folder);
2. one SuperLink (``flower-superlink --insecure``, its own ``FLWR_HOME`` under DIR);
3. one SuperNode per client folder, each started with only its folder (``--node-config 'data="..."'``);
4. ``flwr run flower local --stream`` with the config, the overrides and the run directory DIR/run (written by
   the ServerApp, as on the SuperLink machine);
5. every process it started is stopped (its process group: SIGTERM, then SIGKILL), whatever happened.

``--forget-user U``: then a deletion request on the run (a second ``flwr run`` with ``forget-users=U``): under
local or mixture routed by the ServerApp to the one SuperNode that holds the user, which retrains its client
alone; under pplr / fedavg / fedprox, with ``--retrain-federation``, the whole federation trains again on the
SuperNodes, and only the node that held the user is sent its deleted interactions. The certificate lands in
DIR/run/certificates/.

``--compare RUN``: compare DIR/run/metrics.json with an in-process run's (``privrec federate CONFIG --out RUN``
with the same config and ``--set federated.pooled_scores=true`` on both sides); exit 1 when they differ.
Logs: DIR/logs/{superlink,supernode-C,flwr-run}.log. Exit 0 when the run wrote its metrics (and, with
``--compare``, they are the in-process ones).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr and flower-superexec live here
COMPARED = ("overall", "clients", "balance", "failures", "n_train", "n_test")
ROUND_KEYS = ("round", "mean_train_loss", "client_loss", "valid_auc", "failed", "samples_seen", "bytes")


def comparable(m: dict) -> dict:
    """What a Flower run must share with the in-process run of the same config (the tests' comparison)."""
    keep = {k: m.get(k) for k in COMPARED}
    keep["rounds"] = [{k: r.get(k) for k in ROUND_KEYS} for r in m["rounds"]]
    return keep


def _env(flwr_home: Path) -> dict:
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    print(f"$ {shlex.join(cmd)}  > {log}", file=sys.stderr)
    out = log.open("wb")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each started process's own group (its helper processes too), SIGKILL after 10 s."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _wait_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    import socket

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"run_local: the SuperLink exited (see {log})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise SystemExit(f"run_local: the SuperLink does not listen on 127.0.0.1:{port} after {seconds:.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="experiment YAML with a federated section (configs/pplr-*.yaml)")
    ap.add_argument("--out", required=True, help="new folder: clients/, run/ (the run directory), logs/, flwr-home/")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, applied to the split and to the run (repeatable)")
    ap.add_argument("--client-data", default=None, help="client folders already written by federate-split-data")
    ap.add_argument("--port", type=int, default=8000, help="the SuperLink's port; SuperNode c uses port+10+c")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds the whole run may take")
    ap.add_argument("--compare", default=None, metavar="RUN", help="an in-process run directory to compare with")
    ap.add_argument("--forget-user", type=int, default=None, metavar="U",
                    help="after the run, delete user U through the SuperNode that holds them (local / mixture)")
    ap.add_argument("--retrain-federation", action="store_true",
                    help="with --forget-user on a pplr / fedavg / fedprox run: the whole federation trains again on "
                    "the SuperNodes (only the node holding the user is told what was deleted)")
    args = ap.parse_args(argv)

    from privrec.config import load_config
    from privrec.errors import UserError
    from privrec.federated.client_data import client_folders, split_data
    from privrec.federated.config import FederatedConfig
    from privrec.federated.flower_app import check_flower_config

    out = Path(args.out).resolve()
    config = str(Path(args.config).resolve())
    try:
        cfg = load_config(config, args.overrides, cls=FederatedConfig)
        check_flower_config(cfg)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not empty; give --out a new folder")
        if args.client_data is None:
            split_data(cfg, out / "clients")
        folders = client_folders(args.client_data or out / "clients", cfg)
    except UserError as e:
        print(f"run_local: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    logs, home = out / "logs", out / "flwr-home"
    logs.mkdir(parents=True, exist_ok=True)
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{args.port}"\ninsecure = true\n')
    env = _env(home)
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    try:
        procs.append(_start([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                             "--port", str(args.port)], logs / "superlink.log", env))
        _wait_port(args.port, procs[0], logs / "superlink.log")
        for c, folder in sorted(folders.items()):
            procs.append(_start([str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                 f"127.0.0.1:{args.port}", "--port", str(args.port + 10 + c),
                                 "--node-config", f'data="{folder.resolve()}"'], logs / f"supernode-{c}.log", env))
        run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in {
            "config": config, "out": str(out / "run"), "overrides": ";".join(args.overrides),
            "timeout": args.timeout}.items())
        flwr = _start([str(BIN / "flwr"), "run", "flower", "local", "--stream", "--run-config", run_config],
                      logs / "flwr-run.log", env)
        procs.append(flwr)
        metrics = out / "run" / "metrics.json"
        while not metrics.is_file() and time.monotonic() - t0 < args.timeout:
            if flwr.poll() is not None and not metrics.is_file():
                time.sleep(2)  # the run directory is written just before the ServerApp returns
                if not metrics.is_file():
                    print(f"run_local: flwr run ended (exit {flwr.returncode}) without {metrics}; see {logs}",
                          file=sys.stderr)
                    return 1
            time.sleep(1)
        if not metrics.is_file():
            print(f"run_local: no {metrics} after {args.timeout}s; see {logs}", file=sys.stderr)
            return 1
        if args.forget_user is not None:
            flwr.wait(timeout=max(1, args.timeout - (time.monotonic() - t0)))
            t1 = time.monotonic()
            certs = out / "run" / "certificates"
            rc = run_config + f" forget-users={json.dumps(str(args.forget_user))}" + (
                " retrain-federation=true" if args.retrain_federation else "")
            forget = _start([str(BIN / "flwr"), "run", "flower", "local", "--stream", "--run-config", rc],
                            logs / "flwr-forget.log", env)
            procs.append(forget)
            while not any(certs.glob("*.json")) and time.monotonic() - t0 < args.timeout:
                if forget.poll() is not None:
                    time.sleep(2)
                    if not any(certs.glob("*.json")):
                        print(f"run_local: the deletion request ended (exit {forget.returncode}) without a "
                              f"certificate; see {logs}/flwr-forget.log", file=sys.stderr)
                        return 1
                time.sleep(1)
            if not any(certs.glob("*.json")):
                print(f"run_local: no certificate after {args.timeout}s; see {logs}", file=sys.stderr)
                return 1
            cert = json.loads(next(iter(sorted(certs.glob("*.json")))).read_text())
            print(f"run_local: user {args.forget_user} forgotten through their SuperNode in "
                  f"{time.monotonic() - t1:.0f}s (clients retrained: {cert['body']['affected_shards']}, lineage check "
                  f"{'passed' if cert['body']['lineage_check']['passed'] else 'FAILED'})")
    finally:
        _stop(procs[::-1])
    m = json.loads(metrics.read_text())
    print(f"run_local: {len(folders)} SuperNodes, {m['strategy']} x {len(m['rounds'])} rounds in "
          f"{time.monotonic() - t0:.0f}s; test AUC {m['overall']['auc']:.4f} ({m.get('overall_kind', 'pooled')}); "
          f"run directory {out / 'run'}")
    if args.compare:
        ref = json.loads((Path(args.compare) / "metrics.json").read_text())
        a, b = json.loads(json.dumps(comparable(m))), json.loads(json.dumps(comparable(ref)))
        differ = [k for k in a if a[k] != b[k]]
        print("run_local: the in-process metrics exactly" if not differ else
              f"run_local: differs from {args.compare} in {differ}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
