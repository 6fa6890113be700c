"""privrec: privacy-preserving LLM recommendation (federated LoRA tuning and machine unlearning)."""

__version__ = "0.1.0"
