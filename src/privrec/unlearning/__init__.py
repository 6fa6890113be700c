"""Machine unlearning: exact (APA, SISA, RecEraser-style shards; retraining) and approximate (E2URec, NegGrad,
Bad-Teacher) methods, and the measures of forgetting they share."""
