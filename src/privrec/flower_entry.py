"""The ServerApp and ClientApp objects ``flwr run`` loads (flower/pyproject.toml; docs/federated.md): entry points,
like :mod:`privrec.cli`, so they sit beside it, above the commands they may run.

Importing this module imports flwr (the ``federated`` extra); everything else lives in
:mod:`privrec.federated.flower_app`. The ServerApp reads the config path, ``;``-separated overrides, output
folder and reply timeout from the run config (``[tool.flwr.app.config]`` in flower/pyproject.toml); with
``forget-users`` (comma-separated ids) it runs that deletion request on the run directory ``out`` instead
(``privrec forget``), routed to the node holding the users (strategy local / mixture); a pplr / fedavg /
fedprox model also needs ``retrain-federation=true`` (the whole federation trains again on the nodes).
"""

from __future__ import annotations

from privrec.federated.flower_app import FlowerDispatcher, check_flower_config, flower_retrain, make_client_app


def server_app_from_run_config():
    from flwr.serverapp import ServerApp

    from privrec.commands.forget import parse_users, run_forget
    from privrec.config import load_config
    from privrec.federated.config import FederatedConfig
    from privrec.federated.runner import run_federate
    from privrec.models import load as load_manifest
    from privrec.rundir import RunDir

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        rc = context.run_config
        out = str(rc.get("out", "runs/federate-flower"))
        if str(rc.get("forget-users", "")).strip():  # a deletion request on the run directory `out`
            cfg = RunDir(out, create=False).load_config(cls=FederatedConfig)
            remote = flower_retrain(grid, cfg, dict(load_manifest(out).clients), float(rc.get("timeout", 3600)))
            run_forget(out, users=parse_users(str(rc["forget-users"])), progress=False, remote=remote,
                       retrain_federation=str(rc.get("retrain-federation", "false")).lower() == "true")
            return
        overrides = [s for s in str(rc.get("overrides", "")).split(";") if s.strip()]
        cfg = load_config(str(rc["config"]), overrides, cls=FederatedConfig)
        check_flower_config(cfg)
        run_federate(cfg, out, progress=False, runner="flower",
                     make_dispatcher=lambda fed, model, strategy: FlowerDispatcher(
                         grid, fed, float(rc.get("timeout", 3600))))

    return app


server_app = server_app_from_run_config()
client_app = make_client_app()
