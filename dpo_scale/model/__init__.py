"""The model path: pairs in, per-pair log-probs out (and samples from the policy).

    layout.py           a batch of pairs laid out as rows: padded, packed or prefix-shared, with its attention
    wrapper.py          loading the causal LM (LoRA, activation checkpointing) and PairLogpsModel, its per-pair sums
    streaming_logps.py  the chunked LM head: token log-probs without the (T, V) logits
    unit_attention.py   the attention route that runs the model's kernel once per packed unit
    generation.py       sampling completions from a policy, and their diversity
"""
