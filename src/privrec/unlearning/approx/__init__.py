"""Approximate unlearning (METHODS §5): what every method shares (``task``: its config, the forget set, the
task and result, the paired batches and soft losses), E2URec, and the NegGrad / Bad-Teacher / retrain /
original references. The procedure is ``privrec.commands.unlearn``."""
