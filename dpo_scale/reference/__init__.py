"""The reference's log-probs: the source the loop calls, and where its numbers come from.

    sources.py   ReferenceSource (one method, `logps(batch)`) and the frozen copy, LoRA base and cache sources
    cache.py     the precomputed cache: sharded, fingerprinted, read by key (written by `dpo-scale precompute-ref`)
    nf4.py       a bitsandbytes 4-bit copy of the reference, beside a ZeRO-3 policy
    drift.py     how far the NF4 copy moves the numbers DPO reads from the reference
"""
