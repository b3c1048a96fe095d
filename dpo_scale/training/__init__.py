"""The parts the training loop (commands/train.py) calls, beside the model and the reference.

    sampler.py          the step's global batch of pairs = f(seed, step), the same for any world size
    checkpoint.py       portable per-parameter checkpoints: save, check, restore on any number of ranks
    trained_policy.py   a run's latest checkpoint as a transformers model (eval, export)
    failure_signs.py    warnings for the known ways a DPO run goes wrong
    tracking.py         metrics.jsonl, wandb, the progress bar and the rank-0 print
    run_files.py        the files a run directory holds, and setting an earlier run aside
    plot.py             PNGs of the logged metrics, one run or several overlaid
"""
