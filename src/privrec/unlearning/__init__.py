"""Machine unlearning: exact (APA, SISA, RecEraser-style shards; retraining) and approximate (E2URec, NegGrad,
Bad-Teacher, influence) methods, and the measures of forgetting they share."""

# the methods of ``privrec unlearn`` (METHODS §5): named here once, for the config, the registry and the CLI
UNLEARNING_METHODS = ("e2urec", "neggrad", "bad-teacher", "influence", "retrain", "original")
