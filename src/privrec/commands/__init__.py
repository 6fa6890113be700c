"""One procedure per command, each readable top to bottom: train, evaluate, recommend, baseline, shard-train,
forget, unlearn, federate. ``privrec.cli`` parses the command line and calls one of them."""
