"""Runs as experiments: what tells runs apart, which runs differ only in their random seed, whether a
difference is more than noise, when a run reached a loss, and logging to TensorBoard or W&B.

One run per flag cannot say whether a 0.02 difference in loss is real (Giles Thomas's part 32), so runs
that differ only in --seed and how they ran form a group: docs/experiments.md.
"""

import json
import math
import os
import statistics

import cli

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
    try:
        with open(os.path.join(path, "config.json")) as f:
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


def labels(paths, settings_list, recipes=None, ignore=HOW_IT_RAN):
    """A label per path: its settings that differ from the others' (describe), or its folder name for
    what is not a run (settings None) or differs in nothing."""
    runs = [i for i, s in enumerate(settings_list) if s is not None]
    found = dict(zip(runs, describe([settings_list[i] for i in runs], recipes or {}, ignore))) if runs else {}
    return [found.get(i) or os.path.basename(os.path.normpath(p)) or p for i, p in enumerate(paths)]


def run_labels(paths, recipes=None):
    """A label per run, the seed among what sets it apart."""
    return labels(paths, [run_settings(p) for p in paths], recipes, HOW_IT_RAN - {"seed"})


def describe(settings_list, recipes, ignore):
    """"lr=0.001, recipe=rtx3090" for each settings dict: what sets it apart from the others. When the
    recipe differs, what a recipe sets is left out where a run keeps it (modern's dozen defaults do not
    follow `recipe=modern`); train.py's own defaults, the rtx3090 recipe's, count as kept when every run
    of that recipe has the same value."""
    same = lambda key, group: len({json.dumps(s.get(key), sort_keys=True) for s in group}) == 1
    differing = sorted(k for k in set().union(*settings_list) - ignore if not same(k, settings_list))
    recipe_keys = set().union(*recipes.values())
    labels = []
    for settings in settings_list:
        defaults = recipes.get(settings.get("recipe"), {})
        peers = [s for s in settings_list if s.get("recipe") == settings.get("recipe")]

        def kept(key):
            if key in defaults:
                return defaults[key] == settings.get(key)
            return key in recipe_keys and same(key, peers)

        labels.append(", ".join(f"{k}={settings.get(k)}" for k in differing if k == "recipe" or not kept(k)))
    return labels


# --- groups ---------------------------------------------------------------------------------------

def group_runs(paths, recipes=None):
    """[{"label", "members": [indices into paths]}], in order of first appearance. Run folders whose
    settings differ only in HOW_IT_RAN (the seed among them) share a group; anything else (a
    checkpoint, an OpenAI model) is a group of its own, labelled by its name."""
    groups, index = [], {}
    for i, path in enumerate(paths):
        settings = run_settings(path)
        key = i if settings is None else json.dumps({k: v for k, v in settings.items() if k not in HOW_IT_RAN},
                                                    sort_keys=True)
        if key not in index:
            index[key] = len(groups)
            groups.append({"members": [], "settings": settings})
        groups[index[key]]["members"].append(i)
    names = labels([paths[g["members"][0]] for g in groups], [g["settings"] for g in groups], recipes)
    return [{"label": name, "members": g["members"]} for g, name in zip(groups, names)]


# --- noise ----------------------------------------------------------------------------------------

def mean_and_std(values):
    """(mean, sample standard deviation or None for a single value, n)."""
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def t_quantile(p, dof):
    """Student's t quantile for 0.5 <= p < 1 and any dof > 0, exact to ~1e-9. With x = sqrt(dof) tan(a),
    the CDF is 1/2 + G(dof) * integral_0^a cos(u)^(dof - 1) du, a smooth integrand on [0, pi/2) that
    Simpson's rule integrates; bisection on a then finds p."""
    g = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(math.pi)

    def cdf(a, n=400):
        weights = [1] + [4, 2] * (n // 2 - 1) + [4, 1]
        return 0.5 + g * a / n / 3 * sum(w * math.cos(i * a / n) ** (dof - 1) for i, w in enumerate(weights))
    low, high = 0.0, math.pi / 2
    for _ in range(60):
        low, high = ((low + high) / 2, high) if cdf((low + high) / 2) < p else (low, (low + high) / 2)
    return math.sqrt(dof) * math.tan((low + high) / 2)


def interval(kind, difference, error, dof, n):
    """A difference's 95% interval (difference +- t(0.975, dof) * error) and whether it excludes 0."""
    half = t_quantile(0.975, dof) * error
    return {"kind": kind, "difference": difference, "error": error, "dof": dof, "n": n,
            "low": difference - half, "high": difference + half, "excludes_zero": abs(difference) > half}


def compare_groups(runs, baseline):
    """mean(runs) - mean(baseline) for two groups of (seed, value), with its 95% intervals:
    "paired" when both groups ran the same seeds, once each: Student's t on the n per-seed differences
    (n - 1 dof), which cancels what a seed does to both sides (their initial weights are the same);
    "welch" for any two groups of 2 or more: Welch's t, Welch-Satterthwaite dof. None where n is too small."""
    values, base = [v for _, v in runs], [v for _, v in baseline]
    out = {"difference": statistics.mean(values) - statistics.mean(base), "paired": None, "welch": None}
    seeds, base_seeds = dict(runs), dict(baseline)
    if None not in seeds and seeds.keys() == base_seeds.keys() and len(seeds) == len(runs) > 1 \
            and len(base_seeds) == len(baseline):
        d = [seeds[s] - base_seeds[s] for s in seeds]
        out["paired"] = interval("paired", statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d)), len(d) - 1,
                                 len(d))
    if min(len(values), len(base)) > 1:
        v1, v2 = statistics.variance(values) / len(values), statistics.variance(base) / len(base)
        dof = (v1 + v2) ** 2 / (v1 ** 2 / (len(values) - 1) + v2 ** 2 / (len(base) - 1)) if v1 + v2 else 1.0
        out["welch"] = interval("welch", out["difference"], math.sqrt(v1 + v2), dof, [len(values), len(base)])
    return out


# --- a run's curve ----------------------------------------------------------------------------------

class RunError(Exception):
    """A run folder that cannot be read (the message says what and what to do)."""


def read_metrics(run_dir):
    """The rows of RUN/metrics.jsonl, one per validation. train.py rewrites the file whole (atomically),
    so a line that is not JSON means damage, never a write under way: refused, with its number."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise RunError(f"{path} does not exist: is {run_dir} a train.py --run-dir?")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise RunError(f"{path} line {number} is not JSON: the file is damaged; resuming the run "
                               "rewrites it from its checkpoint, or delete that line") from None
            if not isinstance(rows[-1], dict):
                raise RunError(f"{path} line {number} is not a JSON object: the file is damaged")
    return rows


def reached(rows, target):
    """The first point where the validation loss got to `target` or below, linearly interpolated between
    the validations before and at it: {"step", "tokens_seen", "elapsed_s", "epoch"} (those the rows
    have), or None when it never did."""
    before = None
    for row in (r for r in rows if r.get("val_loss") is not None):
        if row["val_loss"] <= target:
            f = 1.0 if before is None else (before["val_loss"] - target) / (before["val_loss"] - row["val_loss"])
            return {k: row[k] if before is None else before[k] + f * (row[k] - before[k])
                    for k in ("step", "tokens_seen", "elapsed_s", "epoch")
                    if row.get(k) is not None and (before is None or before.get(k) is not None)}
        before = row
    return None


def reached_text(point):
    """"step 1,234, 5.06M tokens, 2.3 hours" (what the point has), or "not reached"."""
    if point is None:
        return "not reached"
    return ", ".join(([f"step {point['step']:,.0f}"] if "step" in point else [])
                     + ([f"{cli.count(point['tokens_seen'])} tokens"] if "tokens_seen" in point else [])
                     + ([cli.duration(point["elapsed_s"])] if "elapsed_s" in point else []))


def mean_reached(points):
    """A group's point: the mean of its runs' (None when any run did not get there)."""
    if not points or None in points:
        return None
    return {k: statistics.mean(p[k] for p in points) for k in set.intersection(*(set(p) for p in points))}


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
        else:
            id_file = os.path.join(run_dir, "wandb.json")
            run_id = json.load(open(id_file))["id"] if os.path.isfile(id_file) else library.util.generate_id()
            with open(id_file, "w") as f:
                json.dump({"id": run_id}, f)
            self.run = library.init(id=run_id, resume="allow", name=os.path.basename(os.path.normpath(run_dir)),
                                    dir=run_dir, config=config, project=os.environ.get("WANDB_PROJECT", "gpt2-from-scratch"))

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
