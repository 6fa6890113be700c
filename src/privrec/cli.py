"""The ``privrec`` command: parse, load the config, call one procedure, print.

Errors a user can fix print one line on stderr and exit 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from privrec.errors import UserError
from privrec.unlearning import UNLEARNING_METHODS

PROGRESS_HELP = (
    "Progress: a long command (train, shard-train, federate, forget, unlearn) draws progress bars on stderr "
    "when stderr is a terminal. When it is not (a pipe, nohup, CI, a file), it prints instead at most one plain "
    "line a minute on stderr ('epoch 1/3: 40/128 batches (31%), 4m10s so far, about 9m10s left'). Every step "
    "also prints one line (prompts cached, zero-shot AUC, each epoch's loss and validation AUC, test AUC) to "
    "stderr and appends it, timestamped, to RUN/log.txt: follow a background run with `tail -f RUN/log.txt`. "
    "--no-progress turns the bars and the minute lines off.")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default also prints the usage)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=2 (repeatable)")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return n


def _add_executor(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=_positive, default=None, metavar="N",
                   help=f"run {what} as Ray tasks on a local Ray cluster of N single-threaded workers "
                   "(executor.kind=ray, executor.workers=N; docs/scaling.md)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help=f"run {what} as Ray tasks on the running Ray cluster at ADDR (`ray start --head` "
                   "prints it; executor.kind=ray, executor.address=ADDR)")


def _executor(args, base=None):
    """The executor a command runs with: ``base`` (a config's ``executor`` section; default local) with the
    command line's --workers / --ray-address over it."""
    from privrec.config import ExecutorConfig
    from privrec.executor import check

    cfg = base or ExecutorConfig()
    if args.workers is not None:
        cfg = cfg.model_copy(update={"kind": "ray", "workers": args.workers, "address": None})
    elif args.ray_address is not None:
        cfg = cfg.model_copy(update={"kind": "ray", "address": args.ray_address})
    check(cfg)  # before anything is recorded or written
    return cfg


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="privrec", description="Privacy-preserving LLM recommendation.", epilog=PROGRESS_HELP)
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bars or minute lines (see below)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("fetch", help="download the embedded model and data into $PRIVREC_HOME")

    p = sub.add_parser("train", help="train a LoRA recommender and evaluate it")
    _add_config(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")

    p = sub.add_parser("evaluate", help="score a trained run on a split")
    p.add_argument("run", help="run directory")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's config, e.g. --set task=ranking to rank with a like-prediction "
                   "adapter (repeatable)")

    p = sub.add_parser("baseline", help="like-rate, item-mean and logistic-regression references")
    _add_config(p)
    p.add_argument("--out", required=True, help="run directory")

    p = sub.add_parser("recommend", help="rank a user's unseen items by P(Yes)")
    p.add_argument("run", help="run directory")
    p.add_argument("--user", type=int, required=True)
    p.add_argument("--top", type=int, default=10)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-candidates", type=int, default=None,
                   help="score only the N most popular unseen items (default: all)")
    g.add_argument("--candidates", type=int, default=None, metavar="C",
                   help="two stages (METHODS §11): C unseen items from popularity + matrix factorisation, "
                   "re-ranked by P(Yes) (as privrec serve does)")
    p.add_argument("--blend", type=float, default=0.0,
                   help="with --candidates: order by (1-B) * rank by P(Yes) + B * rank in the candidate list")
    p.add_argument("--candidate-source", default="popularity", metavar="SOURCE",
                   help="the candidate stage's order (METHODS §11): popularity (the default, chosen on "
                   "validation users, docs/serving.md), mf, or mix (MF and popularity interleaved)")

    p = sub.add_parser("shard-train", help="train one LoRA adapter per shard (APA, SISA, RecEraser-style) "
                       "and score every aggregation")
    _add_config(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="keep shards already trained on the same samples")
    _add_executor(p, "the shards")

    p = sub.add_parser("forget", help="exact unlearning: delete users or samples from a model (shard-train: "
                       "retrain the shards that held them; train: retrain its adapter from scratch; federate: "
                       "retrain the client that held them, or the whole federation with --retrain-federation)")
    p.add_argument("run", help="model directory (privrec shard-train, train or federate)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--users", help="comma-separated user ids, e.g. 12,40")
    g.add_argument("--samples", metavar="FILE", help="file with one sample id (u<user>-i<item>) per line")
    g.add_argument("--clients", help="a federate model: comma-separated client ids that leave it with all their "
                   "users' data (local / mixture: their adapters are dropped)")
    g.add_argument("--resume", action="store_true", help="finish an interrupted request")
    g.add_argument("--verify", action="store_true", help="re-check every certificate against the adapters")
    p.add_argument("--retrain-federation", action="store_true", help="a pplr / fedavg / fedprox / centralised "
                   "federate model: exact forgetting retrains the whole federation without the data (all rounds, "
                   "every client; as slow as training it): asked for explicitly")
    _add_executor(p, "the shards a request retrains (a shards model)")

    p = sub.add_parser("federate", help="federated LoRA tuning: PPLR, FedAvg, FedProx, local, centralised; "
                       "FedABC loss; executed layer split")
    _add_config(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--runner", choices=["in-process", "flower"], default="in-process",
                   help="in-process (default) or a Flower simulation (needs the `federated` extra)")
    p.add_argument("--client-data", metavar="DIR", default=None,
                   help="with --runner flower: the client folders of `privrec federate-split-data` with this "
                   "config, one per simulated node (default: split into a temp folder)")
    _add_executor(p, "each round's clients (in-process)")

    p = sub.add_parser("federate-split-data", help="client-local data for a Flower deployment: one folder per "
                       "client of `privrec federate`'s partition (only its users' rows) and the operator's "
                       "user -> client assignment (docs/federated.md)")
    _add_config(p)
    p.add_argument("--out", required=True, help="new folder: client-0 .. client-{C-1} (one per SuperNode's "
                   "--node-config data=...), assignment.json and config.yaml (the operator's, never a node's)")

    p = sub.add_parser("unlearn", help="forget users from a trained run (E2URec or a baseline) and measure it")
    p.add_argument("run", help="a run directory made by `privrec train`")
    p.add_argument("--method", choices=UNLEARNING_METHODS,
                   help="unlearning method (default: the config's unlearn.method, e2urec); original = measure "
                   "the trained run as it is")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--forget-users", metavar="FILE", help="user ids to forget, one per line")
    g.add_argument("--forget-fraction", type=float, metavar="F",
                   help="forget this fraction of the training users, drawn with the seed (default 0.2)")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--config", default=None, help="YAML with an `unlearn:` section (configs/unlearn/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an unlearn.* value, e.g. --set unlearn.e2urec.alpha=1 (repeatable)")
    p.add_argument("--retrained", metavar="DIR", default=None,
                   help="an `unlearn --method retrain` run on the same forget set: divergence from it and the "
                   "speed-up over it are measured")

    p = sub.add_parser("serve", help="serve recommendations and deletion requests over HTTP (docs/serving.md)")
    p.add_argument("run", help="model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--candidates", type=int, default=50, metavar="C",
                   help="the candidate stage's size (0: the LLM scores every unseen item)")
    p.add_argument("--blend", type=float, default=0.0,
                   help="order by (1-B) * rank by P(Yes) + B * rank in the candidate list (0: the LLM's order)")
    p.add_argument("--candidate-source", default="popularity", metavar="SOURCE",
                   help="the candidate stage's order (METHODS §11): popularity (the default, chosen on "
                   "validation users, docs/serving.md), mf, or mix (MF and popularity interleaved)")
    p.add_argument("--store-k", type=int, default=20, help="items per user kept in the precomputed store")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--precompute", action="store_true",
                   help="keep every user's top-k precomputed (at start and after each applied deletion)")
    g.add_argument("--precompute-only", action="store_true",
                   help="write every user's top-k into MODEL/serve/recommendations.json and exit")
    _add_executor(p, "the store fills (blocks of users) and a deletion's shards (a shards model)")
    p.add_argument("--approximate", choices=["influence"], default=None,
                   help="a shards model: serve each deletion's approximate answer (the affected shard's adapter "
                   "moved by one influence step, METHODS §13) seconds after the request, until the exact replay's "
                   "adapters replace it; only the exact model is certified (off by default)")
    p.add_argument("--approximate-set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --approximate influence: a setting of the step (unlearn.influence's keys, e.g. "
                   "damping=0.01, iterations=8, hessian_samples=32, scale=1)")
    p.add_argument("--swap-at-once", action="store_true",
                   help="with --precompute: swap a deletion's new adapters in as soon as they are trained and fill "
                   "the store afterwards, answering online meanwhile (default: fill it first, while the old "
                   "adapters keep answering from their store)")

    p = sub.add_parser("token", help="bearer tokens of privrec serve: create (printed once) or revoke")
    tsub = p.add_subparsers(dest="token_command", required=True, parser_class=_Parser)
    t = tsub.add_parser("create", help="a new token; only its hash is stored in MODEL/serve/tokens.json")
    t.add_argument("run", help="model directory")
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("--user", type=int, help="a token that reads and deletes only this user's data")
    g.add_argument("--admin", action="store_true", help="a token that may do anything")
    t = tsub.add_parser("revoke", help="revoke a token (a running service sees it on its next request)")
    t.add_argument("run", help="model directory")
    t.add_argument("token_id", help="the token's id, its first characters, or the token itself")

    p = sub.add_parser("data", help="bring your own data: check a table source, export MovieLens, write an example "
                       "(docs/data.md)")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    d = dsub.add_parser("check", help="validate a table source and summarise it (one line per problem, exit 2)")
    d.add_argument("data", help="the schema file, or the folder holding schema.yaml")
    d.add_argument("--like-threshold", type=float, default=3.0,
                   help="the like rule's threshold the summary's like rate uses (data.like_threshold; default 3)")
    d.add_argument("--history-len", type=int, default=10,
                   help="data.history_len: users with no more interactions than this give no sample (default 10)")
    d = dsub.add_parser("export", help="write a built-in source in the table format (schema.yaml + three TSV files)")
    d.add_argument("source", choices=["ml-100k"], help="ml-100k: the embedded copy")
    d.add_argument("out", help="a new folder")
    d = dsub.add_parser("status", help="compare a model's data source now with the files it was trained on")
    d.add_argument("run", help="model directory")
    d = dsub.add_parser("example", help="write a generated catalogue of another domain (planted preferences)")
    d.add_argument("name", choices=["books"], help="books: readers (country, age band) and books (author, "
                   "publisher, subjects, language, price band)")
    d.add_argument("out", help="a new folder")
    d.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("report", help="tables from run directories")
    p.add_argument("runs", nargs="+")
    p.add_argument("--markdown", action="store_true")
    return ap


def _print_metrics(m: dict) -> None:
    keys = ["auc", "uauc", "logloss", "accuracy", "hr@1", "hr@3", "hr@5", "hr@10", "ndcg@3", "ndcg@5", "ndcg@10",
            "n_test", "n", "train_seconds", "train_samples_per_second"]
    print(json.dumps({k: m[k] for k in keys if k in m and m[k] is not None and m[k] == m[k]}, indent=1))


# --- one handler per command: call its procedure, print -------------------------------------------------------
def _fetch(args, progress: bool) -> int:
    from privrec.assets import fetch_all

    for name, path in fetch_all().items():
        print(f"{name}: {path}")
    return 0


def _report(args, progress: bool) -> int:
    from privrec.report import render

    print(render(args.runs, markdown=args.markdown))
    return 0


def _train(args, progress: bool) -> int:
    from privrec.commands.train import run_train
    from privrec.config import load_config
    from privrec.report import render

    run_train(load_config(args.config, args.overrides), args.out, resume=args.resume, progress=progress)
    print(render([args.out]))
    return 0


def _baseline(args, progress: bool) -> int:
    from privrec.commands.baseline import run_baseline
    from privrec.config import load_config
    from privrec.report import render

    run_baseline(load_config(args.config, args.overrides), args.out)
    print(render([args.out]))
    return 0


def _evaluate(args, progress: bool) -> int:
    from privrec.commands.evaluate import run_evaluate

    _print_metrics(run_evaluate(args.run, args.split, progress, args.overrides))
    return 0


def _recommend(args, progress: bool) -> int:
    from privrec.commands.recommend import run_recommend

    for r in run_recommend(args.run, args.user, args.top, args.max_candidates, progress, candidates=args.candidates,
                           blend=args.blend, source=args.candidate_source):
        print(f"{r['rank']:>3}  {r['p_yes']:.4f}  {r['title']}" + (f" ({r['year']})" if r["year"] else ""))
    return 0


def _unlearn(args, progress: bool) -> int:
    from privrec.commands.unlearn import load_unlearn_config, run_unlearn, unlearnable
    from privrec.report import render

    unlearnable(args.run)  # a kind that cannot is refused before its config is read
    cfg = load_unlearn_config(args.run, args.config, args.overrides, args.method, args.forget_users,
                              args.forget_fraction)
    run_unlearn(cfg, args.run, args.out, retrained=args.retrained, progress=progress)
    print(render([args.out]))
    return 0


def _federate(args, progress: bool) -> int:
    from privrec.config import load_config
    from privrec.federated.config import FederatedConfig
    from privrec.federated.runner import render_summary

    cfg = load_config(args.config, args.overrides, cls=FederatedConfig)
    if args.client_data is not None and args.runner != "flower":
        raise UserError("--client-data gives the simulated Flower nodes their folders: add --runner flower")
    if args.runner == "flower" and (args.workers is not None or args.ray_address is not None):
        raise UserError("--workers / --ray-address run in-process clients as Ray tasks; --runner flower has its "
                        "own simulation engine")
    if args.runner == "flower":
        from privrec.federated.flower_app import check_flower_config

        check_flower_config(cfg)
        try:
            from privrec.federated.flower_app import run_flower_simulation
        except ImportError as e:
            raise UserError(f"--runner flower needs the federated extra (pip install -e '.[federated]'): "
                            f"{e}") from None
        m = run_flower_simulation(cfg, args.out, progress, client_data=args.client_data)
    else:
        from privrec.federated.runner import run_federate

        m = run_federate(cfg, args.out, progress=progress, executor=_executor(args, cfg.executor))
    print(render_summary(m))
    return 0


def _federate_split_data(args, progress: bool) -> int:
    from privrec.config import load_config
    from privrec.federated.client_data import ASSIGNMENT, split_data
    from privrec.federated.config import FederatedConfig

    content = split_data(load_config(args.config, args.overrides, cls=FederatedConfig), args.out)
    sizes = {}
    for c in content["assignment"].values():
        sizes[c] = sizes.get(c, 0) + 1
    for c, folder in sorted(content["folders"].items(), key=lambda kv: int(kv[0])):
        print(f"client {c}: {os.path.join(args.out, folder)} ({sizes.get(int(c), 0)} users)")
    print(f"assignment (keep it; give each node only its folder): {os.path.join(args.out, ASSIGNMENT)}")
    return 0


def _shard_train(args, progress: bool) -> int:
    from privrec.commands.shard_train import run_shard_train
    from privrec.config import load_config
    from privrec.unlearning.exact.shards import ApaConfig

    cfg = load_config(args.config, args.overrides, cls=ApaConfig)
    m = run_shard_train(cfg, args.out, args.resume, progress, executor=_executor(args, cfg.executor))
    rows = {f"aggregation {k}": v for k, v in m["auc_by_aggregation"].items()}
    rows["single shards (mean)"] = m["single_shard_mean_auc"]
    if m.get("retrain"):
        rows["full retrain"] = m["retrain"]["auc"]
    print(f"test AUC (n={m['n_test']}), shards {m['shards']} ({m['partition']}):")
    for name, v in rows.items():
        print(f"  {name:<28} {v:.4f}")
    return 0


def _forget(args, progress: bool) -> int:
    from privrec.commands import forget

    if args.verify:
        report = forget.run_verify(args.run)
        for a in report["adapters"]:
            print(f"adapter {a['label']}: {'ok' if a['ok'] else 'FAILED: ' + '; '.join(a['problems'])}")
        for c in report["certificates"]:
            print(f"certificate {c['request']}: {'ok' if c['ok'] else 'FAILED: ' + '; '.join(c['problems'])}")
        print("verified: all checks passed" if report["ok"] else "verification FAILED")
        return 0 if report["ok"] else 1
    executor = _executor(args)
    if args.resume:
        cert = forget.run_resume(args.run, progress, executor=executor)
        if cert is None:
            print("nothing to resume: every request is done")
            return 0
    else:
        users = forget.parse_users(args.users) if args.users is not None else None
        clients = forget.parse_clients(args.clients) if args.clients is not None else None
        cert = forget.run_forget(args.run, users=users, samples_file=args.samples, progress=progress,
                                 clients=clients, retrain_federation=args.retrain_federation,
                                 executor=executor)
        if cert.get("noop"):
            print(cert["message"])
            return 0
    print(json.dumps(cert, indent=1))
    body, rec = cert["body"], cert["record"]
    way, hit = body["run"].get("forget"), body["affected_shards"]
    if way == "retrain-all":
        what = "retrained its adapter from scratch" if hit else "no adapter held them"
    elif way == "retrain-federation":
        what = f"retrained the federation (clients {hit})" if hit else "no adapter held them"
    elif way == "retrain-client":
        what = f"retrained or dropped clients {hit}" if hit else "no adapter held them"
    else:
        what = f"retrained shards {hit}"
    print(f"request {body['request']['id']}: removed {len(body['removed']['samples'])} samples, {what} in "
          f"{rec['retrain_seconds']:.1f}s (request to certificate {rec['wall_seconds']:.1f}s); certificate "
          f"{args.run}/certificates/{body['request']['id']}.json", file=sys.stderr)
    return 0


def _serve(args, progress: bool) -> int:
    from privrec.commands.serve import influence_section, run_precompute, run_serve

    candidates = args.candidates or None
    if args.precompute_only:
        n = run_precompute(args.run, candidates, args.blend, args.store_k, progress=progress,
                           source=args.candidate_source, executor=_executor(args))
        print(f"stored the top {args.store_k} of {n} users in {args.run}/serve/recommendations.json")
        return 0
    print(f"privrec serve: http://{args.host}:{args.port}/ (docs at /docs); Ctrl-C stops", file=sys.stderr)
    if args.swap_at_once and not args.precompute:
        raise UserError("--swap-at-once only changes --precompute; add --precompute or drop it")
    if args.approximate_set and not args.approximate:
        raise UserError("--approximate-set only changes --approximate; add --approximate influence or drop it")
    run_serve(args.run, args.host, args.port, candidates, args.blend, args.store_k, args.precompute,
              source=args.candidate_source, refill_before_swap=not args.swap_at_once, executor=_executor(args),
              approximate=args.approximate, influence=influence_section(args.approximate_set))
    return 0


def _token(args, progress: bool) -> int:
    from privrec.commands.serve import run_token_create, run_token_revoke

    if args.token_command == "create":
        token, record = run_token_create(args.run, None if args.admin else args.user)
        who = "admin" if record["user"] is None else f"user {record['user']}"
        print(token)
        print(f"token {record['id']} for {who}: shown once, only its hash is kept", file=sys.stderr)
    else:
        record = run_token_revoke(args.run, args.token_id)
        print(f"token {record['id']} revoked")
    return 0


def _data(args, progress: bool) -> int:
    from privrec.commands import data

    if args.data_command == "check":
        print("\n".join(data.check(args.data, args.like_threshold, args.history_len)))
    elif args.data_command == "status":
        print("\n".join(data.status(args.run)))
    elif args.data_command == "export":
        print(f"wrote {data.export(args.source, args.out)} (use it with data.source=table data.path={args.out})")
    else:
        print(f"wrote {data.example(args.name, args.out, args.seed)} (check it with privrec data check {args.out})")
    return 0


COMMANDS = {"data": _data, "fetch": _fetch,
            "report": _report, "train": _train, "baseline": _baseline, "evaluate": _evaluate,
            "recommend": _recommend, "unlearn": _unlearn, "federate": _federate,
            "federate-split-data": _federate_split_data, "shard-train": _shard_train,
            "forget": _forget, "serve": _serve, "token": _token}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not ours
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args, not args.no_progress)  # bars on a terminal, else a line a minute
    except UserError as e:
        msg = " ".join(str(e).split())
        print(f"privrec: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("privrec: interrupted (train runs continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
