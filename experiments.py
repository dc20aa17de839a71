"""Runs as experiments: what tells runs apart, which runs differ only in their random seed, whether a
difference is more than noise, and logging a run to TensorBoard or Weights & Biases.

A single run per flag cannot say whether a 0.02 difference in loss is real: Giles Thomas trained
seven extra baselines to learn how much two runs of the same recipe differ (his part 32). So runs
whose settings are the same except for --seed (and how they were run: GPUs, batch split, compile,
validation cadence) form a group; evaluate.py compare and plot_losses.py show a group's mean, its
sample standard deviation and n, and the difference between two groups with its standard error.
"""

import json
import math
import os
import statistics

# Settings that do not change what is trained, only how and where it runs and reports. (The batch
# split is here because 8 GPUs x 1 and 1 GPU x 8 accumulated train the same model; the sequences per
# step stay in.)
HOW_IT_RAN = {"seed", "resume", "device", "log_every", "keep_last", "keep_weights", "allow_setting_change",
              "allow_dataset_change", "log", "val_every",
              "val_minutes", "batch_size", "batch_size_requested", "grad_accum", "world_size", "compile", "fused",
              "ddp_bucket_mb", "shard_muon", "zero1", "total_steps"}
MODEL_FLAGS = {"context_length", "emb_dim", "n_layers", "n_heads", "drop_rate", "qkv_bias", "tie_weights", "init"}


# --- what a run is ---------------------------------------------------------------------------------

def read_config(path):
    """RUN/config.json as a dict, or None when `path` is not a run folder (a checkpoint, `gpt2`)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_settings(path):
    """What was trained: the settings in RUN/config.json with the model flags replaced by the model
    config they resolved to (so `--qkv-bias` and the preset's default compare as values), or None."""
    config = read_config(path)
    if config is None:
        return None
    settings = dict(config.get("training") or config.get("finetune") or {})
    for key in MODEL_FLAGS:
        settings.pop(key, None)
    settings.update(config.get("model_config", {}))
    return settings


def differing_settings(settings_list, ignore=HOW_IT_RAN):
    """For each settings dict, the part that is not the same in all of them (leaving out `ignore`)."""
    keys = set().union(*settings_list) - ignore
    same = lambda k: len({json.dumps(s.get(k), sort_keys=True) for s in settings_list}) == 1
    differing = sorted(k for k in keys if not same(k))
    return [{k: s.get(k) for k in differing} for s in settings_list]


def run_labels(paths, recipes=None):
    """A label per path: its settings that differ from the others' (the seed too), or its folder name."""
    settings = [run_settings(p) for p in paths]
    runs = [i for i, s in enumerate(settings) if s is not None]
    labels = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    found = describe([settings[i] for i in runs], recipes, HOW_IT_RAN - {"seed"}) if runs else []
    for i, label in zip(runs, found):
        labels[i] = label or labels[i]
    return labels


def describe(settings_list, recipes=None, ignore=HOW_IT_RAN):
    """"lr=0.001, recipe=rtx3090" for each settings dict: what sets it apart from the others. When the
    recipe differs, what a recipe sets is left out where a run keeps it (modern's dozen defaults do not
    follow `recipe=modern`); train.py's own defaults, the rtx3090 recipe's, count as kept when every run
    of that recipe has the same value."""
    recipes = recipes or {}
    recipe_keys = set().union(*(r.keys() for r in recipes.values())) if recipes else set()
    labels = []
    for settings, difference in zip(settings_list, differing_settings(settings_list, ignore)):
        defaults = recipes.get(settings.get("recipe"), {})
        peers = [s for s in settings_list if s.get("recipe") == settings.get("recipe")]

        def kept(key):
            if key in defaults:
                return defaults[key] == difference[key]
            return key in recipe_keys and len({json.dumps(s.get(key), sort_keys=True) for s in peers}) == 1

        labels.append(", ".join(f"{k}={v}" for k, v in difference.items() if k == "recipe" or not kept(k)))
    return labels


# --- groups ---------------------------------------------------------------------------------------

def group_runs(paths, recipes=None):
    """[{"label", "members": [indices into paths]}], in order of first appearance. Run folders whose
    settings differ only in HOW_IT_RAN (the seed among them) share a group; anything else (a
    checkpoint, an OpenAI model) is a group of its own, labelled by its name."""
    keyed = []
    for path in paths:
        settings = run_settings(path)
        key = None if settings is None else json.dumps({k: v for k, v in settings.items() if k not in HOW_IT_RAN},
                                                       sort_keys=True)
        keyed.append((key, settings))
    groups, index = [], {}
    for i, (key, settings) in enumerate(keyed):
        if key is not None and key in index:
            groups[index[key]]["members"].append(i)
            continue
        if key is not None:
            index[key] = len(groups)
        groups.append({"members": [i], "settings": settings})
    runs = [g for g in groups if g["settings"] is not None]
    for g, label in zip(runs, describe([g["settings"] for g in runs], recipes) if runs else []):
        g["label"] = label
    for g in groups:
        if not g.get("label"):
            g["label"] = os.path.basename(os.path.normpath(paths[g["members"][0]])) or paths[g["members"][0]]
        del g["settings"]
    return groups


# --- noise ----------------------------------------------------------------------------------------

def mean_and_std(values):
    """(mean, sample standard deviation or None for a single value, n)."""
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def difference_with_error(values, baseline):
    """(mean(values) - mean(baseline), its standard error sqrt(s1^2/n1 + s2^2/n2), or None when either
    side has a single run: one run per side says nothing about the noise)."""
    (m1, s1, n1), (m2, s2, n2) = mean_and_std(values), mean_and_std(baseline)
    error = math.sqrt(s1 ** 2 / n1 + s2 ** 2 / n2) if s1 is not None and s2 is not None else None
    return m1 - m2, error


# --- logging to TensorBoard / Weights & Biases -----------------------------------------------------

def logging_library(kind):
    """The module --log KIND needs, or one line saying how to install it (checked before a run starts)."""
    try:
        if kind == "tensorboard":
            from torch.utils import tensorboard
            return tensorboard
        import wandb
        return wandb
    except ImportError:
        hint = "pip install tensorboard" if kind == "tensorboard" else \
            "pip install wandb (then wandb login, or WANDB_MODE=offline)"
        raise SystemExit(f"error: --log {kind} needs the {kind} package: {hint}") from None


class ExperimentLog:
    """train.py's numbers, also sent to TensorBoard (RUN/tensorboard/) or Weights & Biases. A resumed run
    continues the same log: TensorBoard drops what an earlier session logged after the resumed step
    (purge_step), W&B resumes the run whose id is kept in RUN/wandb.json."""

    def __init__(self, kind, run_dir, config, start_step):
        self.kind = kind
        library = logging_library(kind)
        if kind == "tensorboard":
            # Events after the checkpoint resumed from were logged by a session whose work is lost: drop them.
            self.writer = library.SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1 if start_step else None)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", start_step)
        elif kind == "wandb":
            wandb = library
            id_file = os.path.join(run_dir, "wandb.json")
            run_id = json.load(open(id_file))["id"] if os.path.isfile(id_file) else wandb.util.generate_id()
            with open(id_file, "w") as f:
                json.dump({"id": run_id}, f)
            self.run = wandb.init(id=run_id, resume="allow", name=os.path.basename(os.path.normpath(run_dir)),
                                  dir=run_dir, config=config, project=os.environ.get("WANDB_PROJECT", "gpt2-from-scratch"))
        else:
            raise ValueError(f"unknown log {kind!r}")

    def scalars(self, step, values):
        values = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v)}
        if self.kind == "tensorboard":
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        else:
            self.run.log(values, step=step)

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.run.finish()
