"""Evaluate checkpoints: validation loss against OpenAI's GPT-2 on the same tokens, HellaSwag, samples, answers.

Giles Thomas's RTX 3090 run ended in a comparison on the same FineWeb validation tokens: his model
reached a loss of 3.94 where OpenAI's GPT-2 small reaches 3.50. `compare` makes that table for any
number of checkpoints, runs and OpenAI models (`gpt2`, `gpt2-medium`, ... are converted on the fly
from the Hub's weights, see `huggingface.py from-hf`).

    python evaluate.py loss --run-dir runs/gpt2 --data datasets/fineweb
    python evaluate.py compare runs/gpt2 gpt2 --data datasets/fineweb --markdown --hellaswag hellaswag_val.jsonl
    python evaluate.py hellaswag --checkpoint gpt2 --file hellaswag_val.jsonl
    python evaluate.py generate --checkpoint runs/gpt2/checkpoints/best
    python evaluate.py instruct --run-dir runs/gpt2-instruct --out out/gpt2-answers.jsonl
    python evaluate.py judge out/gpt2-answers.jsonl out/ours-answers.jsonl --model gpt-5.1

A model is named by a checkpoint folder, a run folder (then --which picks its best or latest
checkpoint), one of OpenAI's model names, or a folder/file holding a GPT-2 in the Hub's layout.
Loss: mean cross-entropy over consecutive (B, T) windows of the validation split, batch i being
data.TokenStream(DATA, "val").batch(i * B, B, T), as the RTX 3090 run computed it, by the same
function train.py validates with (training.validation_loss): fp16 autocast on CUDA, fp32 elsewhere,
the loss summed in fp32. So a checkpoint's val loss here equals the one in its run's metrics.jsonl.
Runs that differ only in --seed are grouped (experiments.py): `compare` then shows each group's mean
± sample std and n, and its difference to the --baseline group ± the standard error, so a change is
read against the run-to-run noise.
`instruct` and `judge` are the post's second yardstick, after finetune_instructions.py: a fine-tuned
model's answers to the book's test instructions, scored by an LLM judge and without one. Only their
command lines are here; writing answers files and judging them is judge.py's.
"""

import argparse
import json
import math
import os

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
# llm.c's dev/data/hellaswag.py scores OpenAI's GPT-2 small at 29.55% acc_norm (2,967 items) this way.
HELLASWAG_REPO = "Rowan/hellaswag"
HELLASWAG_FILE = "data/validation-00000-of-00001.parquet"
HELLASWAG_ITEMS_PER_BATCH = 4  # x 4 endings = rows of one padded forward pass

# --eval-set: the windows others publish losses on, with their own method (offset into the val split,
# batch, context, batches; fp16 autocast on CUDA, as evaluation_precision does), and what was published.
# Use them on a dataset made from that source's tokens (prepare_datasets.py --from-tokens).
EVAL_SETS = {
    "gpjt-test": {
        "offset": 50_000_000, "batch_size": 6, "context_length": 1024, "batches": 3_200,
        "about": "Giles Thomas's test loss: 3,200 batches of 6 x 1,024 from token 50,000,000 of "
                 "gpjt/fineweb-gpt2-tokens validation.safetensors",
        "published": "published by Giles Thomas (parts 29-32, 2025): OpenAI GPT-2 small 3.500, GPT-2 medium 3.231; "
                     "his RTX 3090 run 3.944; his 8 x A100 baseline 3.692; his helpful changes stacked 3.578"},
    "llmc-val": {
        "offset": 0, "batch_size": 8, "context_length": 1024, "batches": 1_280,
        "about": "the GPT-2 speedrun's validation: the first 10,485,760 tokens of llm.c's fineweb_val_000000.bin",
        "published": "the GPT-2 (124M) speedrun target of llm.c and modded-nanogpt (2024-25): val loss 3.28"},
}


class EvaluationError(Exception):
    """Bad input to an evaluation (the message says what and what to do)."""


# --- models and devices ---------------------------------------------------------------------------

def peek_context_length(spec, which=WHICH):
    """A model's context length without loading its weights (to pick one window length for all)."""
    if huggingface.is_hf_source(spec):
        if spec in huggingface.HF_GPT2_MODELS and not os.path.exists(spec):
            return 1024  # all four of OpenAI's GPT-2s
        from safetensors import SafetensorError, safe_open
        path = huggingface.hf_weights_path(spec)
        try:
            with safe_open(path, "pt") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if k.endswith("wpe.weight")}
        except (SafetensorError, OSError) as e:
            raise EvaluationError(f"{path} is not a readable safetensors file ({e})") from None
        if not shapes:
            raise EvaluationError(f"{path} is not a GPT-2 in the Hub's layout (no wpe.weight)")
        return next(iter(shapes.values()))[0]
    meta = checkpointing.read_meta(checkpointing.resolve_checkpoint(spec, which))
    return meta["model_config"]["context_length"]


def check_vocabulary(model, needed, what):
    """Token ids up to `needed` - 1 must exist in the model's embedding table."""
    vocab = model.cfg["vocab_size"]
    if needed > vocab:
        raise EvaluationError(f"{what} uses token ids up to {needed - 1} but the model's vocabulary has only "
                              f"{vocab} tokens; evaluate it on data made with its own tokenizer")


# --- validation loss ------------------------------------------------------------------------------

def num_batches(stream, batch_size, context_length, max_batches=None):
    n = stream.num_sequences(context_length) // batch_size
    if n == 0:
        raise EvaluationError(f"the {stream.split} split of {stream.data_dir} has {stream.num_tokens:,} tokens, "
                              f"fewer than one batch of {batch_size} x {context_length} + 1; "
                              "lower --batch-size or --context-length")
    return n if max_batches is None else min(n, max_batches)


def loss_and_tokens(model, stream, batch_size=BATCH_SIZE, context_length=CONTEXT_LENGTH, max_batches=None,
                    device="cpu", desc="val loss"):
    """(mean cross-entropy per token, tokens scored) over the split's consecutive (B, T) windows:
    training.validation_loss, the function train.py validates with."""
    if context_length > model.cfg["context_length"]:
        raise EvaluationError(f"windows of {context_length} tokens exceed the model's context length "
                              f"{model.cfg['context_length']}")
    n = num_batches(stream, batch_size, context_length, max_batches)
    loss = training.validation_loss(model, stream, batch_size, context_length, n, device, desc=desc)
    return loss, n * batch_size * context_length


def check_dataset_vocabulary(model, data_dir):
    """Fail before the first batch when the dataset's tokenizer has ids the model cannot embed."""
    tokenizer = load_manifest(data_dir).get("tokenizer", {})
    if tokenizer.get("n_vocab"):
        check_vocabulary(model, tokenizer["n_vocab"], f"{data_dir} ({tokenizer.get('name', '?')} tokenizer)")


# --- HellaSwag ------------------------------------------------------------------------------------

def download_hellaswag():
    """HellaSwag's validation split (10,042 items) as the Hub's parquet, cached after the first time."""
    return huggingface.hub_file(HELLASWAG_REPO, HELLASWAG_FILE, repo_type="dataset", hint=(
        f"HellaSwag comes from the Hub's dataset {HELLASWAG_REPO}: on a machine online fetch "
        f"https://huggingface.co/datasets/{HELLASWAG_REPO}/resolve/main/{HELLASWAG_FILE} (or the original "
        "hellaswag_val.jsonl from github.com/rowanz/hellaswag) and pass it with --file PATH"))


def check_models(specs, which):
    """Every model named can be loaded: local ones exist, OpenAI's are in the cache or downloaded now.
    Checked before anything is evaluated, so a missing one fails at once, not after an hour of others."""
    for spec in specs:
        if huggingface.is_hf_source(spec):
            huggingface.hf_weights_path(spec)
        else:
            checkpointing.read_meta(checkpointing.resolve_checkpoint(spec, which))


def read_hellaswag(path, limit=None):
    """[{"ctx", "endings", "label": int}] from hellaswag_val.jsonl or the Hub's parquet."""
    if not os.path.isfile(path):
        raise EvaluationError(f"{path} does not exist; pass hellaswag_val.jsonl or the Hub's validation parquet")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path, columns=["ctx", "endings", "label"]).to_pylist()
        except Exception as e:
            raise EvaluationError(f"{path} is not a HellaSwag parquet with ctx, endings, label ({e})") from None
    else:
        rows = []
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        raise EvaluationError(f"{path} line {line_no} is not JSON; pass hellaswag_val.jsonl "
                                              "(one JSON object per line) or a .parquet") from None
    rows = rows[:limit] if limit is not None else rows
    items = []
    for i, row in enumerate(rows):
        try:
            item = {"ctx": row["ctx"], "endings": list(row["endings"]), "label": int(row["label"])}
        except (KeyError, TypeError, ValueError):
            raise EvaluationError(f"{path} item {i} lacks ctx / endings / a numeric label "
                                  "(the test split has no labels; use the validation file)") from None
        if not 0 <= item["label"] < len(item["endings"]):
            raise EvaluationError(f"{path} item {i}: label {item['label']} but {len(item['endings'])} endings")
        items.append(item)
    if not items:
        raise EvaluationError(f"{path} has no items")
    return items


def ending_rows(item, tokenizer, context_length):
    """For each ending: (token row, number of the row's last tokens that are the ending).

    The row is context + " " + ending as llm.c builds it; a row longer than the model's context
    keeps its last `context_length` tokens (the start of the context goes)."""
    ctx = tokenizer.encode_ordinary(item["ctx"])
    rows = []
    for ending in item["endings"]:
        end = tokenizer.encode_ordinary(" " + ending)
        row = (ctx + end)[-context_length:]
        rows.append((row, min(len(end), len(row) - 1)))  # the first token has no prediction
    return rows


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
    for start in tqdm(range(0, len(items), items_per_batch), desc=desc, unit="batch"):
        batch = items[start:start + items_per_batch]
        rows = [r for item in batch for r in ending_rows(item, tokenizer, context_length)]
        sums, means = score_rows(model, rows, device)
        for item in batch:
            k = len(item["endings"])
            scores.append((sums[:k], means[:k]))
            sums, means = sums[k:], means[k:]
    return scores


def hellaswag_accuracy(items, scores):
    """acc: the ending with the lowest summed loss is right; acc_norm: the lowest mean loss (llm.c)."""
    argmin = lambda xs: min(range(len(xs)), key=xs.__getitem__)
    correct = sum(argmin(s) == item["label"] for item, (s, _) in zip(items, scores))
    correct_norm = sum(argmin(m) == item["label"] for item, (_, m) in zip(items, scores))
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n,
            "correct": correct, "correct_norm": correct_norm}


# --- generation -----------------------------------------------------------------------------------

def generate_text(model, prompt=PROMPT, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=TOP_K,
                seed=SEED, device="cpu"):
    """The book's generate from `prompt`; the same seed gives the same text on the same device."""
    tokenizer = gpt.get_tokenizer()
    check_vocabulary(model, tokenizer.n_vocab, "the GPT-2 tokenizer")
    if top_k is not None and not 1 <= top_k <= model.cfg["vocab_size"]:
        raise EvaluationError(f"--top-k must be between 1 and the vocabulary size {model.cfg['vocab_size']}")
    if temperature < 0:
        raise EvaluationError(f"--temperature must be 0 (greedy) or more, not {temperature}")
    torch.manual_seed(seed)
    idx = gpt.text_to_token_ids(prompt, tokenizer).to(device)
    if idx.shape[1] == 0:
        raise EvaluationError("the prompt is empty; pass --prompt TEXT")
    with training.evaluation_precision(device).autocast():
        out = gpt.generate(model, idx, max_new_tokens, context_size=model.cfg["context_length"],
                           temperature=temperature, top_k=top_k)
    # A padded vocabulary (e.g. 50304) has ids no tokenizer knows: they print as nothing.
    return tokenizer.decode([t for t in out[0].tolist() if t < tokenizer.n_vocab])


# --- commands -------------------------------------------------------------------------------------

def eval_windows(args):
    """(stream, batch size, context length, max batches) that --eval-set (or the flags) define."""
    stream = TokenStream(args.data, "val")
    if args.eval_set is None:
        return stream, args.batch_size, args.context_length, args.max_batches
    es = EVAL_SETS[args.eval_set]
    batches = es["batches"] if args.max_batches is None else min(es["batches"], args.max_batches)
    window = TokenWindow(stream, es["offset"])
    if window.num_sequences(es["context_length"]) < batches * es["batch_size"]:
        raise EvaluationError(f"--eval-set {args.eval_set} needs {batches:,} batches of {es['batch_size']} x "
                              f"{es['context_length']} from token {es['offset']:,} of the val split, but {args.data} "
                              "holds fewer; it is defined on that source's tokens (prepare_datasets.py --from-tokens)")
    return window, es["batch_size"], es["context_length"], batches


def check_eval_set_fits(args, context_length):
    if args.eval_set is not None and context_length < EVAL_SETS[args.eval_set]["context_length"]:
        raise EvaluationError(f"--eval-set {args.eval_set} scores windows of {EVAL_SETS[args.eval_set]['context_length']} "
                              f"tokens; a model here has a context of {context_length}")


def cmd_loss(args):
    device = gpt.resolve_device(args.device)
    spec = args.checkpoint or args.run_dir
    stream, args.batch_size, args.context_length, args.max_batches = eval_windows(args)
    model, where = huggingface.load_any(spec, args.which, device)
    check_dataset_vocabulary(model, args.data)
    context_length = min(args.context_length, model.cfg["context_length"])
    check_eval_set_fits(args, context_length)
    loss, tokens = loss_and_tokens(model, stream, args.batch_size, context_length, args.max_batches, device,
                                   desc=f"val loss {os.path.basename(os.path.normpath(spec))}")
    result = {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "model": spec, "path": where,
              "data": args.data, "batch_size": args.batch_size, "context_length": context_length}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{spec}: val loss {loss:.4f}, perplexity {math.exp(loss):.2f} over {tokens:,} tokens "
              f"({tokens // (args.batch_size * context_length)} batches of {args.batch_size} x {context_length}) "
              f"of {args.data}")


def format_table(rows, markdown, with_hellaswag):
    header = ["model", "parameters", "val loss", "perplexity"] + (["HellaSwag acc_norm"] if with_hellaswag else [])
    lines = []
    for r in rows:
        cells = [r["model"], f"{r['parameters'] / 1e6:.1f}M", f"{r['loss']:.4f}", f"{r['perplexity']:.2f}"]
        if with_hellaswag:
            cells.append(f"{100 * r['hellaswag']['acc_norm']:.2f}%")
        lines.append(cells)
    return cli.render_table(header, lines, markdown)


def group_rows(specs, rows, baseline=None):
    """The rows grouped as experiments.group_runs groups their runs (settings equal but for the seed):
    per group n, mean and sample std of the val loss (and HellaSwag acc_norm), and the difference of its
    mean loss to the baseline group's with the standard error of that difference."""
    groups = experiments.group_runs(specs, RECIPES)
    if baseline is not None and baseline not in specs:
        raise EvaluationError(f"--baseline {baseline} is not one of the models compared")
    base = next(g for g in groups if baseline is None or specs.index(baseline) in g["members"])
    base_losses = [rows[i]["loss"] for i in base["members"]]
    out = []
    for g in groups:
        losses = [rows[i]["loss"] for i in g["members"]]
        mean, std, n = experiments.mean_and_std(losses)
        entry = {"label": g["label"], "models": [specs[i] for i in g["members"]], "n": n, "loss_mean": mean,
                 "loss_std": std, "baseline": g is base}
        entry["difference"], entry["difference_error"] = experiments.difference_with_error(losses, base_losses)
        if all("hellaswag" in rows[i] for i in g["members"]):
            entry["hellaswag_mean"], entry["hellaswag_std"], _ = experiments.mean_and_std(
                rows[i]["hellaswag"]["acc_norm"] for i in g["members"])
        out.append(entry)
    return out


def format_group_table(groups, markdown, with_hellaswag):
    pm = lambda mean, std, digits, scale=1: f"{scale * mean:.{digits}f}" + ("" if std is None else f" ± {scale * std:.{digits}f}")
    header = ["group", "n", "val loss"] + (["HellaSwag acc_norm %"] if with_hellaswag else []) + ["vs baseline"]
    lines = []
    for g in groups:
        cells = [g["label"], str(g["n"]), pm(g["loss_mean"], g["loss_std"], 4)]
        if with_hellaswag:
            cells.append(pm(g["hellaswag_mean"], g["hellaswag_std"], 2, 100) if "hellaswag_mean" in g else "-")
        if g["baseline"]:
            cells.append("baseline")
        else:
            error = g["difference_error"]
            cells.append(f"{g['difference']:+.4f}" + (f" ± {error:.4f}" if error is not None else " (noise unknown: one run)"))
        lines.append(cells)
    return cli.render_table(header, lines, markdown)


def cmd_compare(args):
    device = gpt.resolve_device(args.device)
    stream, args.batch_size, args.context_length, args.max_batches = eval_windows(args)
    items = read_hellaswag(args.hellaswag, args.hellaswag_limit) if args.hellaswag else None
    check_models(args.models, args.which)
    # One window length for every model, so all are scored on exactly the same tokens.
    context_length = min([args.context_length] + [peek_context_length(s, args.which) for s in args.models])
    check_eval_set_fits(args, context_length)
    rows = []
    for spec in args.models:
        model, where = huggingface.load_any(spec, args.which, device)
        check_dataset_vocabulary(model, args.data)
        name = os.path.basename(os.path.normpath(spec))
        loss, tokens = loss_and_tokens(model, stream, args.batch_size, context_length, args.max_batches, device,
                                       desc=f"val loss {name}")
        row = {"model": spec, "path": where, "parameters": gpt.count_parameters(model), "loss": loss,
               "perplexity": math.exp(loss), "tokens": tokens, "eval_set": args.eval_set or f"{args.data} val split"}
        if items is not None:
            row["hellaswag"] = hellaswag_accuracy(items, hellaswag_scores(model, items, device,
                                                                          desc=f"hellaswag {name}"))
        rows.append(row)
        del model
    groups = group_rows(args.models, rows, args.baseline)
    if args.json:
        print(json.dumps({"runs": rows, "groups": groups}))
        return
    grouped = any(g["n"] > 1 for g in groups)
    if grouped:
        print(format_group_table(groups, args.markdown, items is not None))
        print("\n± after a mean: the sample standard deviation over the group's runs (they differ only in --seed);\n"
              "± after a difference: its standard error. A difference under about twice that is within the noise.")
    if args.per_run or not grouped:
        print(("\n" if grouped else "") + format_table(rows, args.markdown, items is not None))
    print(f"\n{rows[0]['tokens']:,} validation tokens of {args.data}, windows of {args.batch_size} x {context_length}"
          + (f"; HellaSwag: {len(items):,} items of {args.hellaswag}" if items else "") + ".")
    if args.eval_set is not None and context_length == EVAL_SETS[args.eval_set]["context_length"]:
        es = EVAL_SETS[args.eval_set]
        whole = rows[0]["tokens"] == es["batches"] * es["batch_size"] * es["context_length"]
        print(f"{es['about']}{'' if whole else ' (here only its first ' + str(args.max_batches) + ' batches)'}; "
              f"{es['published']}")


def cmd_hellaswag(args):
    device = gpt.resolve_device(args.device)
    check_models([args.checkpoint or args.run_dir], args.which)
    items = read_hellaswag(args.file or download_hellaswag(), args.limit)
    model, _ = huggingface.load_any(args.checkpoint or args.run_dir, args.which, device)
    result = hellaswag_accuracy(items, hellaswag_scores(model, items, device, args.batch_size))
    if args.json:
        print(json.dumps({k: result[k] for k in ("acc", "acc_norm", "n")}))
    else:
        print(f"HellaSwag: acc {100 * result['acc']:.2f}% ({result['correct']:,}/{result['n']:,}), "
              f"acc_norm {100 * result['acc_norm']:.2f}% ({result['correct_norm']:,}/{result['n']:,}); "
              "OpenAI's GPT-2 small: acc_norm 29.55% (llm.c)")


def cmd_generate(args):
    device = gpt.resolve_device(args.device)
    model, _ = huggingface.load_any(args.checkpoint or args.run_dir, args.which, device)
    print(generate_text(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, device))


# --- instruction-following answers and their judge: judge.py's --------------------------------------

def cmd_instruct(args):
    device = gpt.resolve_device(args.device)
    spec = args.checkpoint or args.run_dir

    def load_model():
        model, where = huggingface.load_any(spec, args.which, device)
        check_vocabulary(model, gpt.get_tokenizer().n_vocab, "the GPT-2 tokenizer")
        return model, where

    judge.write_answers(load_model, args.out, args.data, args.name or os.path.basename(os.path.normpath(spec)),
                        args.max_new_tokens, device)


def cmd_judge(args):
    judge.score_answers(args.answers, args.model, args.api_base, args.cache, args.temperature, args.timeout,
                        args.retries, args.retry_wait, args.seed, args.out, args.json)


def add_model_args(p, required=True):
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--checkpoint", help="a checkpoint folder, a Hub GPT-2 folder/file, or "
                                            f"one of {', '.join(huggingface.HF_GPT2_MODELS)}")
    group.add_argument("--run-dir", help="a run folder (train.py --run-dir); --which picks the checkpoint")
    p.add_argument("--which", default=WHICH, help=f"in a run folder: best, latest or step-NNNNNNNN (default: {WHICH})")


def add_common_args(p):
    p.add_argument("--device", default=DEVICE, help=f"auto, cpu, cuda, cuda:N or mps (default: {DEVICE})")
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


def add_loss_command(sub):
    p = sub.add_parser("loss", help="validation loss and perplexity of one model")
    add_model_args(p)
    add_loss_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_loss)


def add_compare_command(sub):
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
    p.add_argument("--hellaswag", metavar="FILE", help="add a HellaSwag acc_norm column scored on FILE "
                                                       "(hellaswag_val.jsonl or the Hub's parquet)")
    p.add_argument("--hellaswag-limit", type=cli.positive_int, help="only the first N HellaSwag items (default: all)")
    add_common_args(p)
    p.set_defaults(func=cmd_compare)


def add_hellaswag_command(sub):
    p = sub.add_parser("hellaswag", help="HellaSwag accuracy (acc and acc_norm, scored as llm.c does)")
    add_model_args(p)
    p.add_argument("--file", help="hellaswag_val.jsonl or the Hub's validation parquet (default: download "
                                  f"{HELLASWAG_REPO}/{HELLASWAG_FILE} and cache it)")
    p.add_argument("--limit", type=cli.positive_int, help="only the first N items (default: all)")
    p.add_argument("--batch-size", type=cli.positive_int, default=HELLASWAG_ITEMS_PER_BATCH,
                   help=f"items per forward pass, 4 endings each (default: {HELLASWAG_ITEMS_PER_BATCH})")
    add_common_args(p)
    p.set_defaults(func=cmd_hellaswag)


def add_generate_command(sub):
    p = sub.add_parser("generate", help="sample text from a model (the book's chapter 5 sampling settings)")
    add_model_args(p)
    p.add_argument("--prompt", default=PROMPT, help=f"text to continue (default: {PROMPT!r})")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=MAX_NEW_TOKENS, help=f"default: {MAX_NEW_TOKENS}")
    p.add_argument("--temperature", type=cli.non_negative_float, default=TEMPERATURE,
                   help=f"0 = greedy; higher = more random (default: {TEMPERATURE})")
    p.add_argument("--top-k", type=cli.positive_int, default=TOP_K,
                   help=f"sample among the k likeliest tokens (default: {TOP_K})")
    p.add_argument("--seed", type=int, default=SEED,
                   help=f"random seed: the same seed gives the same text on the same device (default: {SEED})")
    p.add_argument("--device", default=DEVICE, help=f"auto, cpu, cuda, cuda:N or mps (default: {DEVICE})")
    p.set_defaults(func=cmd_generate)


def add_instruct_command(sub):
    p = sub.add_parser("instruct", help="a fine-tuned model's greedy answers to the instruction data's test split, "
                                        "as JSONL (resumable)")
    add_model_args(p)
    p.add_argument("--data", help="instruction data in the book's format (default: the book's instruction-data.json, "
                                  f"downloaded to {instructions.BOOK_DATA_PATH} on first use)")
    p.add_argument("--out", required=True, help="the answers file (JSONL); PATH.partial until every answer is in")
    p.add_argument("--name", help="the model's name in the answers and the judge's table (default: the folder's name)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=instructions.MAX_NEW_TOKENS,
                   help=f"longest answer in tokens (default: {instructions.MAX_NEW_TOKENS}, the book's)")
    p.add_argument("--device", default=DEVICE, help=f"auto, cpu, cuda, cuda:N or mps (default: {DEVICE})")
    p.set_defaults(func=cmd_instruct)


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
                   help=f"seconds before the first retry (default: {judge.RETRY_WAIT:g})")
    p.add_argument("--json", action="store_true",
                   help="print per model {mean, ci_low, ci_high, n, rouge_l, reference_loss, win_rate} as JSON")
    p.set_defaults(func=cmd_judge)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_loss_command(sub)
    add_compare_command(sub)
    add_hellaswag_command(sub)
    add_generate_command(sub)
    add_instruct_command(sub)
    add_judge_command(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    with cli.errors_end_in_one_line(EvaluationError, CheckpointError, huggingface.HubError, DatasetError,
                                    gpt.DeviceError, instructions.InstructionError, judge.JudgeError):
        args.func(args)


if __name__ == "__main__":
    main()
