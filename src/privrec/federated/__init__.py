"""Federated LLMRec (METHODS §2 PPLR, §3 FedABC): clients, strategies, the executed split, runners."""
