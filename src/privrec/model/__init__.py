"""The model: the backbone, prompt encoding, the frozen-layer cache, the recommender LM with its adapters, and
the adapter arithmetic (mixtures, matrix factorisation)."""
