"""The ServerApp and ClientApp objects ``flwr run`` loads (flower/pyproject.toml; docs/federated.md).

Importing this module imports flwr (the ``federated`` extra); everything else lives in
:mod:`privrec.federated.flower_app`.
"""

from privrec.federated.flower_app import make_client_app, server_app_from_run_config

server_app = server_app_from_run_config()
client_app = make_client_app()
