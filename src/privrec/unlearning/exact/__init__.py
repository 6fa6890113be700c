"""Exact unlearning (METHODS §4, §6, §7): shards and their partition, APA's aggregation, the deletion ledger
and the erasure certificates. The procedures are ``privrec.commands.shard_train`` and
``privrec.commands.forget`` (which also retrains a one-adapter model from scratch)."""
