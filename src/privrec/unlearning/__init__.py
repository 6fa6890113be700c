"""Machine unlearning: exact (APA, retraining) and approximate (E2URec, NegGrad, Bad-Teacher) methods."""
