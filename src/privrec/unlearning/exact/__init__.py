"""Exact unlearning (METHODS §4, §6, §7): shards and their partition, APA's aggregation, the deletion ledger
and the erasure certificates, and the forgetting engine: the request state machine (``forget``), its
verification (``verify``) and the routes of a one-adapter and a shards model (``routes``). ``privrec
shard-train`` trains the shards; ``privrec forget`` parses a request and calls the engine."""
