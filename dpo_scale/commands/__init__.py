"""The `dpo-scale` commands that assemble the parts: one module per command, named after it, holding the function
`cli.py` calls once it has parsed the arguments into a config (and what only that command uses).

    train.py            build -> train -> close: the loop
    precompute_ref.py   the reference's log-probs of every pair, into the cache `reference.source=cache` reads
    eval.py             a trained policy against its reference: held-out pairs and sampled generations
    export.py           a run's latest weights as a Hugging Face model directory
    sweep.py            every point of a hyperparameter grid, each a `dpo-scale train`
    logps.py            every pair's chosen/rejected log-prob sums, to JSONL
    ref_drift.py        how far an NF4 reference drifts from the full-precision model
    data_report.py      what is in the training data, from its token store
    demo.py             a tiny model and preference data, then the core on them

A command imports parts (the other packages) and never another command; no part imports a command. What two
commands share is a part. `config`, `prepare-data` and `plot` are each one part's call, made from `cli.py`.
"""
