"""Evaluate checkpoints: validation loss against OpenAI's GPT-2 on the same tokens, HellaSwag, samples, answers.

Giles Thomas's RTX 3090 run reached 3.94 where OpenAI's GPT-2 small reaches 3.50 on the same FineWeb
validation tokens; `compare` makes that table for any checkpoints, runs and OpenAI models (docs/stages.md).

    python evaluate.py loss --run-dir runs/gpt2 --data datasets/fineweb
    python evaluate.py compare runs/gpt2 gpt2 --data datasets/fineweb --markdown --hellaswag hellaswag_val.jsonl
    python evaluate.py hellaswag --checkpoint gpt2 --file hellaswag_val.jsonl
    python evaluate.py generate --checkpoint runs/gpt2/checkpoints/best
    python evaluate.py instruct --run-dir runs/gpt2-instruct --out out/gpt2-answers.jsonl
    python evaluate.py judge out/gpt2-answers.jsonl out/ours-answers.jsonl --model gpt-5.1

A model is a checkpoint folder, a run folder (--which picks its checkpoint), one of OpenAI's model names,
or a GPT-2 in the Hub's layout. The loss is training.validation_loss, train.py's, so a checkpoint's loss
here equals its run's metrics.jsonl. Runs that differ only in --seed are grouped (docs/experiments.md).
"""

import argparse
import codecs
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import checkpointing
import experiments
import gpt
import huggingface
import instructions
import judge
import reference
import training
from checkpointing import CheckpointError
from data import DatasetError, TokenStream, TokenWindow, load_manifest
from recipes import RECIPES

BATCH_SIZE = reference.BATCH_SIZE  # 6, the RTX 3090 run's evaluation batch
CONTEXT_LENGTH = 1024     # window length; capped at the model's context length
MAX_BATCHES = None        # None: every whole batch of the validation split
WHICH = "best"            # which checkpoint of a run folder
DEVICE = "auto"           # cuda, then mps, then cpu

# The RTX 3090 run's sample (the book's chapter 5 sampling settings).
PROMPT = "Every effort moves you"
MAX_NEW_TOKENS = 15
TEMPERATURE = 1.4
TOP_K = 25
SEED = 123

# HellaSwag validation (10,042 items) in the Hub's parquet; the original hellaswag_val.jsonl works too.
HELLASWAG_REPO = "Rowan/hellaswag"
HELLASWAG_FILE = "data/validation-00000-of-00001.parquet"
HELLASWAG_ITEMS_PER_BATCH = 4  # x 4 endings = rows of one padded forward pass

EVAL_SETS = reference.EVAL_SETS  # --eval-set: the windows others publish losses on


class EvaluationError(Exception):
    """Bad input to an evaluation (the message says what and what to do)."""


# --- models and devices ---------------------------------------------------------------------------

def peek_context_length(spec, which=WHICH):
    """A model's context length without loading its weights (to pick one window length for all). Called
    for every model before any is evaluated, it also fails at once for one that cannot be loaded (OpenAI's
    are found in the cache or downloaded now), not after an hour of others."""
    if huggingface.is_hf_source(spec):
        path = huggingface.hf_weights_path(spec)
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, "pt") as f:
                shapes = {k.removeprefix("transformer."): f.get_slice(k).get_shape() for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise EvaluationError(f"{path} is not a readable safetensors file ({e})") from None
        return huggingface.hf_model_config(path, shapes)["context_length"]  # checks its config.json too
    meta = checkpointing.read_meta(checkpointing.resolve_checkpoint(spec, which))
    return meta["model_config"]["context_length"]


def check_vocabulary(model, needed, what):
    """Token ids up to `needed` - 1 must exist in the model's embedding table."""
    vocab = model.cfg["vocab_size"]
    if needed > vocab:
        raise EvaluationError(f"{what} uses token ids up to {needed - 1} but the model's vocabulary has only "
                              f"{vocab} tokens; evaluate it on data made with its own tokenizer")


def model_spec(args):
    """The model --checkpoint or --run-dir names; a file as --run-dir would be read as Hub weights."""
    if args.run_dir and os.path.isfile(args.run_dir):
        raise EvaluationError(f"--run-dir {args.run_dir} is a file, not a run folder; pass a run folder, or a "
                              "checkpoint or model file with --checkpoint")
    return args.checkpoint or args.run_dir


# --- HellaSwag ------------------------------------------------------------------------------------

def download_hellaswag():
    """HellaSwag's validation split (10,042 items) as the Hub's parquet, cached after the first time."""
    return huggingface.hub_file(HELLASWAG_REPO, HELLASWAG_FILE, repo_type="dataset", hint=(
        f"HellaSwag comes from the Hub's dataset {HELLASWAG_REPO}: on a machine online fetch "
        f"https://huggingface.co/datasets/{HELLASWAG_REPO}/resolve/main/{HELLASWAG_FILE} (or the original "
        "hellaswag_val.jsonl from github.com/rowanz/hellaswag) and pass it with --file PATH"))


def read_hellaswag(path, limit=None):
    """[{"ctx", "endings", "label": int}] from hellaswag_val.jsonl or the Hub's parquet, each checked to be
    a HellaSwag item (an item with 3 endings would be scored as a 3-way choice, and skew acc_norm)."""
    if not os.path.isfile(path):
        raise EvaluationError(f"{path} does not exist; pass hellaswag_val.jsonl or the Hub's validation parquet")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path, columns=["ctx", "endings", "label"]).to_pylist()
        except Exception as e:
            raise EvaluationError(f"{path} is not a HellaSwag parquet with ctx, endings, label ({e})") from None
        rows = [(f"row {i}", row) for i, row in enumerate(rows)]
    else:
        rows = []
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                try:
                    rows += [(f"line {line_no}", json.loads(line))] if line.strip() else []
                except ValueError:
                    raise EvaluationError(f"{path} line {line_no} is not JSON; pass hellaswag_val.jsonl "
                                          "(one JSON object per line) or a .parquet") from None
    items = []
    for where, row in rows[:limit]:
        try:
            item = {"ctx": row["ctx"], "endings": list(row["endings"]), "label": int(row["label"])}
        except (KeyError, TypeError, ValueError):
            raise EvaluationError(f"{path} {where} lacks ctx / endings / a numeric label "
                                  "(the test split has no labels; use the validation file)") from None
        if not (isinstance(item["ctx"], str) and item["ctx"].strip() and len(item["endings"]) == 4
                and all(isinstance(e, str) for e in item["endings"]) and 0 <= item["label"] <= 3):
            raise EvaluationError(f"{path} {where} is not a HellaSwag item (a non-empty ctx, 4 endings, a label "
                                  f"0-3): it has {len(item['endings'])} endings and label {item['label']}")
        items.append(item)
    if not items:
        raise EvaluationError(f"{path} has no items")
    return items


@torch.no_grad()
def score_rows(model, rows, device):
    """Summed and mean cross-entropy of each row's ending tokens, in one right-padded batch."""
    length = max(len(r) for r, _ in rows)
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length - 1)
    for i, (row, n_end) in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(row) - 1 - n_end:len(row) - 1] = 1  # logits at t predict token t + 1
    tokens, mask = tokens.to(device), mask.to(device)
    with training.evaluation_precision(device).autocast():
        logits = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                             reduction="none").view(len(rows), length - 1) * mask
    sums = losses.sum(dim=1)
    return sums.tolist(), (sums / mask.sum(dim=1).clamp(min=1)).tolist()


def hellaswag_scores(model, items, device="cpu", items_per_batch=HELLASWAG_ITEMS_PER_BATCH, desc="hellaswag"):
    """Per item: (summed losses of its endings, mean losses of its endings)."""
    tokenizer = gpt.get_tokenizer()
    check_vocabulary(model, tokenizer.n_vocab, "the GPT-2 tokenizer")
    context_length = model.cfg["context_length"]
    scores = []
    for start in tqdm(range(0, len(items), items_per_batch), desc=desc, unit="batch", leave=False, disable=desc is None):
        rows = []  # (context + " " + ending as llm.c builds it, how many of its last tokens are the ending)
        for item in items[start:start + items_per_batch]:
            ctx = tokenizer.encode_ordinary(item["ctx"])
            for end in (tokenizer.encode_ordinary(" " + ending) for ending in item["endings"]):
                row = (ctx + end)[-context_length:]  # too long for the model: the context's start goes
                rows.append((row, min(len(end), len(row) - 1)))  # the first token has no prediction
        sums, means = score_rows(model, rows, device)
        scores += [(sums[i:i + 4], means[i:i + 4]) for i in range(0, len(rows), 4)]  # 4 endings an item
    return scores


def hellaswag(model, items, device="cpu", items_per_batch=HELLASWAG_ITEMS_PER_BATCH, desc="hellaswag"):
    """HellaSwag as llm.c scores it: {"acc_norm", "acc", "n", "correct_norm", "correct"}. acc_norm (the
    ending with the lowest mean loss per token is the model's answer) is the number llm.c publishes
    (reference.HELLASWAG_ACC_NORM_LLMC); acc takes the lowest summed loss."""
    scores = hellaswag_scores(model, items, device, items_per_batch, desc)
    argmin = lambda xs: min(range(len(xs)), key=xs.__getitem__)
    correct = sum(argmin(s) == item["label"] for item, (s, _) in zip(items, scores))
    correct_norm = sum(argmin(m) == item["label"] for item, (_, m) in zip(items, scores))
    n = len(items)
    return {"acc_norm": correct_norm / n, "acc": correct / n, "n": n, "correct_norm": correct_norm,
            "correct": correct}


def published_hellaswag():
    return ("HellaSwag acc_norm, llm.c's scoring, as published by llm.c on all 10,042 items: " +
            ", ".join(f"{k} {100 * v:.2f}%" for k, v in reference.HELLASWAG_ACC_NORM_LLMC.items()))


# --- generation -----------------------------------------------------------------------------------

def generate(model, prompt=PROMPT, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=TOP_K,
             seed=SEED, device="cpu"):
    """The book's generate from `prompt`, printed to stdout token by token as it is made (so Ctrl-C
    keeps what was printed); the same seed gives the same text on the same device."""
    tokenizer = gpt.get_tokenizer()
    check_vocabulary(model, tokenizer.n_vocab, "the GPT-2 tokenizer")
    if top_k is not None and not 1 <= top_k <= model.cfg["vocab_size"]:
        raise EvaluationError(f"--top-k must be between 1 and the vocabulary size {model.cfg['vocab_size']}")
    context = model.cfg["context_length"]
    if max_new_tokens > context:
        raise EvaluationError(f"--max-new-tokens {max_new_tokens:,} is more than the model's context of {context:,} "
                              "tokens: past it the model no longer sees the prompt (its window slides on); ask for "
                              f"at most {context:,}")
    torch.manual_seed(seed)
    idx = gpt.text_to_token_ids(prompt, tokenizer).to(device)
    if idx.shape[1] == 0:
        raise EvaluationError("the prompt is empty; pass --prompt TEXT")
    text = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span tokens

    def write(ids, final=False):  # a padded vocabulary (e.g. 50304) has ids no tokenizer knows: they print as nothing
        sys.stdout.write(text.decode(tokenizer.decode_bytes([t for t in ids if t < tokenizer.n_vocab]), final))
        sys.stdout.flush()

    # gpt.generate is the book's loop. Each forward pass after its first takes the token just sampled as
    # its last input, so a hook there sees every token as it is made (the last one, after the loop).
    started = []

    def stream(module, inputs):
        if started:
            write([inputs[0][0, -1].item()])
        started.append(True)
    hook = model.register_forward_pre_hook(stream)
    write(idx[0].tolist())
    try:
        with training.evaluation_precision(device).autocast():
            out = gpt.generate(model, idx, max_new_tokens, context_size=context, temperature=temperature, top_k=top_k)
    finally:
        hook.remove()
    write(out[0, -1:].tolist(), final=True)
    print()


# --- commands -------------------------------------------------------------------------------------

def eval_set_windows(stream, name, max_batches=None):
    """(windows, batch size, context length, batches) of EVAL_SETS[name] in a val split (train.py
    --eval-set scores them at every validation)."""
    es = EVAL_SETS[name]
    batches = es["batches"] if max_batches is None else min(es["batches"], max_batches)
    window = TokenWindow(stream, es["offset"])
    if window.num_sequences(es["context_length"]) < batches * es["batch_size"]:
        raise EvaluationError(f"--eval-set {name} needs {batches:,} batches of {es['batch_size']} x "
                              f"{es['context_length']} from token {es['offset']:,} of the val split, but "
                              f"{stream.data_dir} holds fewer; it is defined on that source's tokens "
                              "(prepare_datasets.py --from-tokens)")
    return window, es["batch_size"], es["context_length"], batches


def score_models(args, device, items=None):
    """(a row per model of args.models, the window length): all scored on the same windows."""
    stream = TokenStream(args.data, "val")
    if args.eval_set is not None:
        stream, args.batch_size, args.context_length, args.max_batches = eval_set_windows(
            stream, args.eval_set, args.max_batches)
    # One window length for every model, so all are scored on exactly the same tokens.
    context_length = min([args.context_length] + [peek_context_length(s, args.which) for s in args.models])
    if args.eval_set is not None and context_length < EVAL_SETS[args.eval_set]["context_length"]:
        raise EvaluationError(f"--eval-set {args.eval_set} scores windows of {EVAL_SETS[args.eval_set]['context_length']} "
                              f"tokens; a model here has a context of {context_length}")
    batches = stream.num_sequences(context_length) // args.batch_size
    if batches == 0:
        raise EvaluationError(f"the {stream.split} split of {stream.data_dir} has {stream.num_tokens:,} tokens, "
                              f"fewer than one batch of {args.batch_size} x {context_length} + 1; "
                              "lower --batch-size or --context-length")
    batches = batches if args.max_batches is None else min(batches, args.max_batches)
    tokenizer = load_manifest(args.data).get("tokenizer", {})
    rows = []
    for spec in args.models:
        model, where = huggingface.load_any(spec, args.which, device)
        if tokenizer.get("n_vocab"):  # before the first batch: ids the model cannot embed
            check_vocabulary(model, tokenizer["n_vocab"], f"{args.data} ({tokenizer.get('name', '?')} tokenizer)")
        name = os.path.basename(os.path.normpath(spec))
        # training.validation_loss, the function train.py validates with
        loss = training.validation_loss(model, stream, args.batch_size, context_length, batches, device,
                                        desc=f"val loss {name}")
        row = {"model": spec, "path": where, "parameters": gpt.count_parameters(model), "loss": loss,
               "perplexity": math.exp(loss), "tokens": batches * args.batch_size * context_length, "eval_set": args.eval_set or f"{args.data} val split"}
        if items is not None:
            row["hellaswag"] = hellaswag(model, items, device, desc=f"hellaswag {name}")
        rows.append(row)
        del model
    return rows, context_length


def cmd_loss(args):
    args.models = [model_spec(args)]
    (row,), context_length = score_models(args, gpt.resolve_device(args.device))
    if args.json:
        print(json.dumps({**row, "data": args.data, "batch_size": args.batch_size, "context_length": context_length}))
    else:
        print(f"{row['model']}: val loss {row['loss']:.4f}, perplexity {row['perplexity']:.2f} over {row['tokens']:,} "
              f"tokens ({row['tokens'] // (args.batch_size * context_length)} batches of {args.batch_size} x "
              f"{context_length}) of {args.data}")


HELLASWAG_COLUMN = "HellaSwag acc_norm, llm.c's scoring"


def format_table(rows, markdown, with_hellaswag, target=None):
    """One row per model; `target` heads the column of where each run's val loss reached it."""
    header = ["model", "parameters", "val loss", "perplexity"] + [HELLASWAG_COLUMN] * with_hellaswag
    lines = []
    for r in rows:
        cells = [r["model"], f"{r['parameters'] / 1e6:.1f}M", f"{r['loss']:.4f}", f"{r['perplexity']:.2f}"]
        if with_hellaswag:
            cells.append(f"{100 * r['hellaswag']['acc_norm']:.2f}%")
        cells += [experiments.reached_text(r["reached"]) if "reached" in r else "-"] * bool(target)
        lines.append(cells)
    return cli.render_table(header + [f"reached {target}"] * bool(target), lines, markdown)


def group_rows(specs, rows, baseline=None):
    """Per group of runs equal but for the seed (experiments.group_runs): n, mean and std of the val loss
    and HellaSwag, the difference to the baseline group (experiments.compare_groups), the mean reached."""
    groups = experiments.group_runs(specs, RECIPES)
    if baseline is not None and baseline not in specs:
        raise EvaluationError(f"--baseline {baseline} is not one of the models compared")
    base = next(g for g in groups if baseline is None or specs.index(baseline) in g["members"])
    seed = lambda i: (experiments.run_settings(specs[i]) or {}).get("seed")
    seeded = lambda g: [(seed(i), rows[i]["loss"]) for i in g["members"]]
    out = []
    for g in groups:
        mean, std, n = experiments.mean_and_std(rows[i]["loss"] for i in g["members"])
        entry = {"label": g["label"], "models": [specs[i] for i in g["members"]], "n": n, "loss_mean": mean,
                 "loss_std": std, "baseline": g is base}
        if g is not base:
            entry.update(experiments.compare_groups(seeded(g), seeded(base)))
        if all("hellaswag" in rows[i] for i in g["members"]):
            entry["hellaswag_mean"], entry["hellaswag_std"], _ = experiments.mean_and_std(
                rows[i]["hellaswag"]["acc_norm"] for i in g["members"])
        if all("reached" in rows[i] for i in g["members"]):
            points = [rows[i]["reached"] for i in g["members"]]
            entry["reached"], entry["reached_by"] = experiments.mean_reached(points), n - points.count(None)
        out.append(entry)
    return out


def format_group_table(groups, markdown, with_hellaswag, target=None):
    pm = lambda mean, std, digits, scale=1: f"{scale * mean:.{digits}f}" + ("" if std is None else f" ± {scale * std:.{digits}f}")
    header = ["group", "n", "val loss"] + [HELLASWAG_COLUMN] * with_hellaswag + \
        ["vs baseline", "95% interval", "beyond noise"] + [f"reached {target}"] * bool(target)
    lines = []
    for g in groups:
        cells = [g["label"], str(g["n"]), pm(g["loss_mean"], g["loss_std"], 4)]
        if with_hellaswag:
            cells.append(pm(g["hellaswag_mean"], g["hellaswag_std"], 2, 100) + "%" if "hellaswag_mean" in g else "-")
        ci = g.get("paired") or g.get("welch")
        if g["baseline"]:
            cells += ["baseline", "", ""]
        elif ci is None:
            cells += [f"{g['difference']:+.4f}", "one run: noise unknown", "?"]
        else:
            how = f"paired, n={ci['n']}" if ci["kind"] == "paired" else f"Welch, {ci['dof']:.1f} dof"
            cells += [f"{g['difference']:+.4f}", f"{ci['low']:+.4f} to {ci['high']:+.4f} ({how})",
                      "yes" if ci["excludes_zero"] else "no"]
        if target:
            missed = g["n"] - g.get("reached_by", g["n"])
            by = f" by {missed} of {g['n']}" if g["n"] > 1 and missed else ""
            cells.append(experiments.reached_text(g["reached"]) + by if "reached" in g else "-")
        lines.append(cells)
    return cli.render_table(header, lines, markdown)


GROUPS_NOTE = """
± after a mean: the sample standard deviation over the group's runs (they differ only in --seed).
vs baseline: the difference of the mean val losses, with its 95% interval: paired by seed (Student's t
on the per-seed differences) when both groups ran the same seeds, else Welch's t; beyond noise: excludes 0."""


def cmd_compare(args):
    device = gpt.resolve_device(args.device)
    named = [os.path.realpath(m) if os.path.exists(m) else m for m in args.models]
    twice = next((m for i, m in enumerate(args.models) if named[i] in named[:i]), None)
    if twice is not None:
        raise EvaluationError(f"{twice} is named twice: one run would count as a group of two; name each model once")
    target = args.target
    if target is not None and target not in args.models:
        try:
            target = float(target)
        except ValueError:
            raise EvaluationError(f"--target {target} is neither a loss nor one of the models compared; name it "
                                  "among the models too, so its loss is measured on the same windows") from None
    curves = {m: experiments.read_metrics(m) for m in args.models
              if target is not None and os.path.isfile(os.path.join(m, "metrics.jsonl"))}  # run folders
    items = read_hellaswag(args.hellaswag, args.hellaswag_limit) if args.hellaswag else None
    rows, context_length = score_models(args, device, items)
    value = target if target is None or isinstance(target, float) else rows[args.models.index(target)]["loss"]
    for row in (r for r in rows if r["model"] in curves):  # run folders, when there is a --target
        row["reached"] = experiments.reached(curves[row["model"]], value)
    groups = group_rows(args.models, rows, args.baseline)
    if args.json:
        print(json.dumps({"runs": rows, "groups": groups, "target": value}))
        return
    if target is not None:
        target = f"{value:g}" if isinstance(target, float) else f"{target}'s {value:.4f}"
    grouped = any(g["n"] > 1 for g in groups)
    if grouped:
        print(format_group_table(groups, args.markdown, items is not None, target) + "\n" + GROUPS_NOTE)
    if args.per_run or not grouped:
        print(("\n" if grouped else "") + format_table(rows, args.markdown, items is not None, target))
    print(f"\n{rows[0]['tokens']:,} validation tokens of {args.data}, windows of {args.batch_size} x {context_length}"
          + (f"; HellaSwag: {len(items):,} items of {args.hellaswag}" if items else "") + ".")
    if target:
        print(f"reached {target}: the first step, tokens and training time at which a run's validation loss\n"
              "(RUN/metrics.jsonl) got there, interpolated between validations; a group's is its runs' mean.")
    if items:
        print(published_hellaswag())
    if args.eval_set is not None:  # score_models refused a shorter window
        es = EVAL_SETS[args.eval_set]
        whole = rows[0]["tokens"] == es["batches"] * es["batch_size"] * es["context_length"]
        print(f"{es['about']}{'' if whole else ' (here only its first ' + str(args.max_batches) + ' batches)'}; "
              f"{es['published']}")


def cmd_hellaswag(args):
    device = gpt.resolve_device(args.device)
    spec = model_spec(args)
    peek_context_length(spec, args.which)  # a model that cannot be loaded fails before the download
    items = read_hellaswag(args.file or download_hellaswag(), args.limit)
    model, _ = huggingface.load_any(spec, args.which, device)
    result = hellaswag(model, items, device, args.batch_size)
    if args.json:
        print(json.dumps({k: result[k] for k in ("acc", "acc_norm", "n")}))
    else:
        print(f"{HELLASWAG_COLUMN}: {100 * result['acc_norm']:.2f}% ({result['correct_norm']:,}/{result['n']:,}); "
              f"acc {100 * result['acc']:.2f}% ({result['correct']:,}/{result['n']:,})\n{published_hellaswag()}")


def cmd_generate(args):
    device = gpt.resolve_device(args.device)
    model, _ = huggingface.load_any(model_spec(args), args.which, device)
    try:
        generate(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, device)
    except KeyboardInterrupt:
        print()  # the text so far stays; the line saying so goes under it
        raise


# --- instruction-following answers and their judge: judge.py's --------------------------------------

def cmd_instruct(args):
    device = gpt.resolve_device(args.device)
    spec = model_spec(args)
    if os.path.isdir(args.out):
        raise EvaluationError(f"--out {args.out} is a folder; name the answers file, e.g. "
                              f"{os.path.join(args.out, 'answers.jsonl')}")

    def load_model():
        model, where = huggingface.load_any(spec, args.which, device)
        check_vocabulary(model, gpt.get_tokenizer().n_vocab, "the GPT-2 tokenizer")
        return model, where

    judge.write_answers(load_model, args.out, args.data, args.name or os.path.basename(os.path.normpath(spec)),
                        args.max_new_tokens, device)


def cmd_judge(args):
    judge.score_answers(args.answers, args.model, args.api_base, args.cache, args.temperature, args.timeout,
                        args.retries, args.retry_wait, args.seed, args.out, args.json)


def add_model_args(p):
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", help="a checkpoint folder, a Hub GPT-2 folder/file, or "
                                            f"one of {', '.join(huggingface.HF_GPT2_MODELS)}")
    group.add_argument("--run-dir", help="a run folder (train.py --run-dir); --which picks the checkpoint")
    p.add_argument("--which", default=WHICH, help=f"in a run folder: best, latest or step-NNNNNNNN (default: {WHICH})")


def add_device_arg(p, json_too=True):
    p.add_argument("--device", default=DEVICE, help=f"auto, cpu, cuda, cuda:N or mps (default: {DEVICE})")
    if json_too:
        p.add_argument("--json", action="store_true", help="print the result as JSON instead of text")


def add_loss_args(p):
    p.add_argument("--data", required=True,
                   help="a prepared dataset folder (prepare_datasets.py); its val split is used")
    p.add_argument("--batch-size", type=cli.positive_int, default=BATCH_SIZE, help=f"windows per batch (default: {BATCH_SIZE})")
    p.add_argument("--context-length", type=cli.positive_int, default=CONTEXT_LENGTH,
                   help=f"tokens per window, capped at the model's context length (default: {CONTEXT_LENGTH})")
    p.add_argument("--max-batches", type=cli.positive_int, default=MAX_BATCHES,
                   help="score only the first K batches (default: all whole batches of the split, or of the eval set)")
    p.add_argument("--eval-set", choices=list(EVAL_SETS),
                   help="score the windows others publish losses on, with their batch and context (which then "
                        "replace --batch-size and --context-length): " +
                        "; ".join(f"{name}: {es['about']}" for name, es in EVAL_SETS.items()) +
                        " (default: the val split from its start)")


NOTHING_KEPT = "nothing was kept (the result is printed at the end); run the same command again"


def add_judge_command(sub):
    p = sub.add_parser("judge", help="score answers files: every model's answer to an item in one prompt to an LLM "
                                     "judge (any OpenAI-compatible endpoint), and ROUGE-L without one")
    p.add_argument("answers", nargs="+", help="answers files from evaluate.py instruct, one per model, same items")
    p.add_argument("--model", help="the judge model, e.g. gpt-5.1, or llama3 on a local server (default: no judge, "
                                   "only the scores that need none)")
    p.add_argument("--api-base", default=judge.API_BASE,
                   help=f"an OpenAI-compatible endpoint (default: {judge.API_BASE}, which needs OPENAI_API_KEY; "
                        "ollama: http://localhost:11434/v1)")
    p.add_argument("--temperature", type=cli.non_negative_float,
                   help="sampling temperature sent to the judge (default: the endpoint's own; some models take no other)")
    p.add_argument("--seed", type=int, default=judge.SEED,
                   help=f"random seed of the order the models are shown in, and of the bootstrap (default: {judge.SEED})")
    p.add_argument("--cache", default=judge.CACHE,
                   help=f"every judgment is kept here, so a rerun asks only what was never answered (default: {judge.CACHE})")
    p.add_argument("--out", help="also write each item's scores, comments and model order to this JSONL")
    p.add_argument("--timeout", type=cli.positive_float, default=judge.TIMEOUT, help=f"seconds per request (default: {judge.TIMEOUT:g})")
    p.add_argument("--retries", type=cli.non_negative_int, default=judge.RETRIES,
                   help=f"retries after a network failure or HTTP 429/5xx, with doubling waits (default: {judge.RETRIES})")
    p.add_argument("--retry-wait", type=cli.non_negative_float, default=judge.RETRY_WAIT,
                   help="seconds before the first retry, doubling, each stretched by up to 50%% at random; a "
                        f"server's Retry-After comes first (default: {judge.RETRY_WAIT:g})")
    p.add_argument("--json", action="store_true",
                   help="print per model {mean, ci_low, ci_high, n, rouge_l, reference_loss, win_rate} as JSON")
    p.set_defaults(func=cmd_judge, stopped="every judgment received is kept in {cache}; run the same command again "
                                           "to ask only for the rest")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("loss", help="validation loss and perplexity of one model")
    add_model_args(p)
    add_loss_args(p)
    add_device_arg(p)
    p.set_defaults(func=cmd_loss, stopped=NOTHING_KEPT)

    p = sub.add_parser("compare", help="a table of several models' validation losses on the same tokens")
    p.add_argument("models", nargs="+", help="checkpoint folders, run folders, Hub GPT-2 folders or names "
                                             f"({', '.join(huggingface.HF_GPT2_MODELS)})")
    p.add_argument("--which", default=WHICH, help=f"in run folders: best, latest or step-NNNNNNNN (default: {WHICH})")
    add_loss_args(p)
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--baseline", help="the model (one of those listed) whose group the others are compared with "
                                      "(default: the first)")
    p.add_argument("--per-run", action="store_true",
                   help="with groups of runs that differ only in --seed, also print every run's own row")
    p.add_argument("--hellaswag", metavar="FILE", help="add a HellaSwag acc_norm column (llm.c's scoring) scored "
                                                       "on FILE (hellaswag_val.jsonl or the Hub's parquet)")
    p.add_argument("--hellaswag-limit", type=cli.positive_int, help="only the first N HellaSwag items (default: all)")
    p.add_argument("--target", help="a loss to reach, e.g. 3.50, or a model compared, e.g. gpt2 (its loss on the "
                                    "same windows): adds where each run's validation loss first reached it (step, "
                                    "tokens, time; from RUN/metrics.jsonl)")
    add_device_arg(p)
    p.set_defaults(func=cmd_compare, stopped=NOTHING_KEPT)

    p = sub.add_parser("hellaswag", help="HellaSwag accuracy (acc_norm and acc, scored as llm.c does)")
    add_model_args(p)
    p.add_argument("--file", help="hellaswag_val.jsonl or the Hub's validation parquet (default: download "
                                  f"{HELLASWAG_REPO}/{HELLASWAG_FILE} and cache it)")
    p.add_argument("--limit", type=cli.positive_int, help="only the first N items (default: all)")
    p.add_argument("--batch-size", type=cli.positive_int, default=HELLASWAG_ITEMS_PER_BATCH,
                   help=f"items per forward pass, 4 endings each (default: {HELLASWAG_ITEMS_PER_BATCH})")
    add_device_arg(p)
    p.set_defaults(func=cmd_hellaswag, stopped=NOTHING_KEPT)

    p = sub.add_parser("generate", help="sample text from a model (the book's chapter 5 sampling settings)")
    add_model_args(p)
    p.add_argument("--prompt", default=PROMPT, help=f"text to continue (default: {PROMPT!r})")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=MAX_NEW_TOKENS,
                   help=f"at most the model's context length (default: {MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=cli.non_negative_float, default=TEMPERATURE,
                   help=f"0 = greedy; higher = more random (default: {TEMPERATURE})")
    p.add_argument("--top-k", type=cli.positive_int, default=TOP_K,
                   help=f"sample among the k likeliest tokens (default: {TOP_K})")
    p.add_argument("--seed", type=int, default=SEED,
                   help=f"random seed: the same seed gives the same text on the same device (default: {SEED})")
    add_device_arg(p, json_too=False)
    p.set_defaults(func=cmd_generate, stopped="the text so far is above; run the command again for a whole sample")

    p = sub.add_parser("instruct", help="a fine-tuned model's greedy answers to the instruction data's test split, "
                                        "as JSONL (resumable)")
    add_model_args(p)
    p.add_argument("--data", help="instruction data in the book's format (default: the book's instruction-data.json, "
                                  f"downloaded to {instructions.BOOK_DATA_PATH} on first use)")
    p.add_argument("--out", required=True, help="the answers file (JSONL); PATH.partial until every answer is in")
    p.add_argument("--name", help="the model's name in the answers and the judge's table (default: the folder's name)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=instructions.MAX_NEW_TOKENS,
                   help=f"longest answer in tokens (default: {instructions.MAX_NEW_TOKENS}, the book's)")
    add_device_arg(p, json_too=False)
    p.set_defaults(func=cmd_instruct, stopped="the answers so far are kept in {out}.partial; run the same command "
                                              "again to continue")

    add_judge_command(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    with cli.errors_end_in_one_line(EvaluationError, CheckpointError, huggingface.HubError, DatasetError,
                                    gpt.DeviceError, instructions.InstructionError, judge.JudgeError,
                                    experiments.RunError, stopped=lambda: args.stopped.format(**vars(args))):
        args.func(args)


if __name__ == "__main__":
    main()
