"""``privrec serve MODEL``: recommendations and the right to be forgotten as an HTTP service (METHODS §11).

- :mod:`.auth`: bearer tokens (``privrec token create / revoke``), stored hashed in the model directory;
- :mod:`.store`: every user's precomputed top-k, read by the recommendations endpoint when it is current;
- :mod:`.service`: the service's state: the recommender it serves (swapped in whole after each deletion),
  the users it refuses, the one deletion worker (requests applied in order through ``privrec forget``'s own
  procedure), request metrics;
- :mod:`.app`: the FastAPI app (endpoints, errors as ``{"error": ...}``, body-size limit) and the web page
  (``page.html``).

docs/serving.md describes the endpoints, the deletion semantics and their durability.
"""

from privrec.rundir import SERVE_DIR  # MODEL/serve/: tokens.json, recommendations.json (rundir names every file)

__all__ = ["SERVE_DIR"]
