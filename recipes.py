"""--recipe: the named sets of defaults for train.py (and measure_tokens_per_second.py); each flag still
wins. No torch here: plot_losses.py names runs by their recipe without loading it."""

RECIPES = {
    # Giles Thomas's RTX 3090 run, as he trained it: the constants at the top of train.py.
    "rtx3090": {},
    # What GPT-3 / nanoGPT-style runs do.
    "modern": {
        "lr": 6e-4,                   # GPT-3 paper, table 2.1, 125M model
        "beta2": 0.95,                # GPT-3 paper, appendix B
        "schedule": "cosine",
        "warmup_steps": 715,          # GPT-3: 375M warmup tokens / 0.5M tokens per step; a run with far
                                      # fewer tokens per step should set its own (train.check_schedule)
        "min_lr": 6e-5,               # GPT-3: decay to 10% of the peak
        "tokens_per_step": 524288,    # 2**19, ~0.5M tokens (GPT-3 small's batch), via grad accumulation
        "batch_size": "auto",         # the largest micro-batch that fits and divides the step
        "drop_rate": 0.0,
        "grad_clip": 1.0,
        "decay_matrices_only": True,
        "precision": "bf16",
        "fused": "cuda",
        "compile": "cuda",
        "init": "gpt2",
    },
}

# train.py's defaults (its constants) for the settings of the step the measure scripts time without
# importing train.py; tests/test_recipes.py checks they are train.py's.
STEP_DEFAULTS = {"optimizer": "adamw", "fused": False, "compile": False, "grad_clip": 0.0,
                 "decay_matrices_only": False, "shard_muon": True, "zero1": False}
