"""Checkpoints: save and load a GPTModel (and a training run's full state) as safetensors + JSON.

A checkpoint is a folder that describes itself, so `evaluate.py` or `generate.py` can load it with
nothing else from the run:
    model.safetensors         the weights, under the book's state-dict keys (a tied head is stored once)
    checkpoint.json           {"model_config": ..., "step": ..., "val_loss": ..., "files": {name: bytes}, ...}
    train_state.safetensors   (training checkpoints) optimizer moments, RNG states, loss accumulators;
                              their non-tensor half lives in checkpoint.json["train_state"]
Nothing is pickled and nothing is read with torch.load.

A run keeps its checkpoints in RUN/checkpoints/step-00001234/, with `latest` and `best` pointing at
the newest and the lowest-validation-loss complete ones. Every checkpoint is written into a
temporary folder beside its final place, fsynced, then renamed, and the pointers are replaced
atomically, so a kill at any instant leaves the previous checkpoint and pointers intact.

    python checkpointing.py info runs/gpt2                  # config, step and losses of RUN's best
    python checkpointing.py info runs/gpt2 --which latest
    python checkpointing.py list runs/gpt2                  # every checkpoint of a run
"""

import argparse
import json
import os
import re
import shutil
import time

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gpt import EOT_TOKEN, GPTModel, count_parameters, model_config

MODEL_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
TRAIN_STATE_FILE = "train_state.safetensors"
CHECKPOINTS = "checkpoints"       # RUN/checkpoints/
POINTERS = ("latest", "best")     # RUN/checkpoints/latest, RUN/checkpoints/best
STEP_DIR = "step-{:08d}"          # RUN/checkpoints/step-00001234
STEP_DIR_RE = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"              # unfinished writes; never listed as checkpoints


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or unreadable (the message names the path)."""


# --- writing atomically ---------------------------------------------------------------------------

def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def write_json_atomic(path, obj):
    """Write JSON to path.tmp, fsync, rename: readers see the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(os.path.abspath(path)))


def unwrap_model(model):
    """The GPTModel inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_tensors(model):
    """The state dict as contiguous CPU tensors, each storage once: safetensors refuses shared tensors,
    and with tied weights `out_head.weight` is `tok_emb.weight` (GPTModel.load_state_dict re-ties it)."""
    tensors, seen = {}, set()
    for name, t in unwrap_model(model).state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype, t.device)
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors


def save_checkpoint(out_dir, model, meta=None, train_tensors=None, train_json=None):
    """Atomically write a checkpoint folder at out_dir (replacing one already there).

    train_tensors / train_json: a training run's state (see train.py); without them the folder holds
    just the model. Files go to a temporary folder beside out_dir, are fsynced, then the folder is
    renamed into place; checkpoint.json is written last and lists every file's size, so a folder whose
    files do not match it is known to be damaged.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{os.path.basename(out_dir)}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)

    files = {MODEL_FILE: model_tensors(model)}
    if train_tensors is not None:
        files[TRAIN_STATE_FILE] = {k: v.detach().to("cpu").contiguous() for k, v in train_tensors.items()}
    sizes = {}
    for name, tensors in files.items():
        path = os.path.join(tmp, name)
        save_file(tensors, path)
        _fsync_path(path)
        sizes[name] = os.path.getsize(path)

    model_cfg = dict(unwrap_model(model).cfg)
    doc = {"model_config": model_cfg, **(meta or {}), "files": sizes, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if train_json is not None:
        doc["train_state"] = train_json
    write_json_atomic(os.path.join(tmp, META_FILE), doc)
    _fsync_path(tmp)

    if os.path.lexists(out_dir):
        # Re-saving a step (a run resumed from an older checkpoint): move the old one aside first,
        # since a folder cannot be renamed over a non-empty one.
        trash = os.path.join(parent, f"{TMP_PREFIX}old-{os.path.basename(out_dir)}-{os.getpid()}")
        os.rename(out_dir, trash)
        os.rename(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)
    _fsync_path(parent)
    return out_dir


def save_model(model, out_dir, meta=None):
    """Atomically write model.safetensors + checkpoint.json ({"model_config": cfg, **meta}) to out_dir."""
    return save_checkpoint(out_dir, model, meta)


def set_pointer(run_dir, name, target):
    """Point RUN/checkpoints/<name> ("latest" or "best") at the checkpoint folder `target`, atomically.

    A relative symlink, so the run folder can be moved; where symlinks are not allowed (Windows
    without developer mode) a small JSON file {"checkpoint": "step-..."} instead."""
    ckpt_root = os.path.join(run_dir, CHECKPOINTS)
    link = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f"{TMP_PREFIX}{name}-{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    target_name = os.path.basename(os.path.normpath(target))
    try:
        os.symlink(target_name, tmp, target_is_directory=True)
    except (OSError, NotImplementedError):
        with open(tmp, "w") as f:
            json.dump({"checkpoint": target_name}, f)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, link)
    _fsync_path(ckpt_root)


# --- reading --------------------------------------------------------------------------------------

def _read_pointer(link):
    if os.path.islink(link):
        return os.path.join(os.path.dirname(link), os.readlink(link))
    if os.path.isfile(link):
        with open(link) as f:
            return os.path.join(os.path.dirname(link), json.load(f)["checkpoint"])
    return link


def resolve_checkpoint(path, which="best"):
    """The checkpoint folder `path` names: a checkpoint folder itself, or a run folder (then its
    checkpoints/<which>, which = "best" / "latest" / a checkpoint name like "step-00001000")."""
    if os.path.isfile(os.path.join(path, META_FILE)):
        return os.path.normpath(path)
    for candidate in (os.path.join(path, CHECKPOINTS, which), os.path.join(path, which)):
        if os.path.lexists(candidate):
            target = os.path.normpath(_read_pointer(candidate))
            if not os.path.isfile(os.path.join(target, META_FILE)):
                raise CheckpointError(f"{candidate} points to {target}, which is not a complete checkpoint "
                                      f"(no {META_FILE}); pick another with --which or a step-* folder")
            return target
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; pass a run folder or a checkpoint folder")
    raise CheckpointError(f"{path} is neither a checkpoint (no {META_FILE}) nor a run with a "
                          f"'{which}' checkpoint (no {os.path.join(path, CHECKPOINTS, which)})")


def read_meta(ckpt_dir):
    """checkpoint.json of a checkpoint folder, after checking its files are all there, whole."""
    path = os.path.join(ckpt_dir, META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint: {META_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise CheckpointError(f"{path} has no model_config; the checkpoint is damaged")
    for name, size in meta.get("files", {MODEL_FILE: None}).items():
        file = os.path.join(ckpt_dir, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
        if size is not None and os.path.getsize(file) != size:
            raise CheckpointError(f"{file} has {os.path.getsize(file):,} bytes, {META_FILE} says {size:,}; "
                                  "the checkpoint is damaged (a write was cut short?)")
    return meta


def load_tensors(ckpt_dir, name, device="cpu"):
    path = os.path.join(ckpt_dir, name)
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not load ({e}); the checkpoint is damaged") from None


def check_headers(ckpt_dir):
    """read_meta, then parse every safetensors header: catches a damaged folder without reading
    gigabytes of tensors."""
    meta = read_meta(ckpt_dir)
    for name in meta.get("files", {}):
        path = os.path.join(ckpt_dir, name)
        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} does not load ({e}); the checkpoint is damaged") from None
    return meta


def load_model(path, device="cpu", which="best"):
    """(GPTModel in eval mode on `device`, checkpoint.json as a dict) from a checkpoint or run folder."""
    ckpt_dir = resolve_checkpoint(path, which)
    meta = read_meta(ckpt_dir)
    state = load_tensors(ckpt_dir, MODEL_FILE, device)
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = GPTModel(meta["model_config"])
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_dir}/{MODEL_FILE} does not match its model_config: {e}") from None
    if model.cfg["tie_weights"]:
        model.out_head.weight = model.tok_emb.weight  # assign=True made two Parameters of one tensor
    meta["path"] = ckpt_dir
    return model.eval(), meta


def list_checkpoints(run_dir):
    """[(step, folder)] of RUN/checkpoints/step-*, oldest first; unfinished temporary folders skipped."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)) and not os.path.islink(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def strip_train_state(ckpt_dir):
    """Keep weights + metrics only: drop the optimizer state (2/3 of a training checkpoint's bytes).
    checkpoint.json is rewritten first, so a kill in between leaves a stray file, not a lie."""
    meta = read_meta(ckpt_dir)
    if TRAIN_STATE_FILE not in meta.get("files", {}):
        return
    meta["files"].pop(TRAIN_STATE_FILE)
    meta.pop("train_state", None)
    meta.pop("path", None)
    write_json_atomic(os.path.join(ckpt_dir, META_FILE), meta)
    os.remove(os.path.join(ckpt_dir, TRAIN_STATE_FILE))


# --- command line ---------------------------------------------------------------------------------

def _summary(meta):
    cfg = meta["model_config"]
    val = meta.get("val_loss")
    val = f"val_loss {val:.4f}" if val is not None else "no val_loss"
    return (f"step {meta.get('step', '?')}, tokens {meta.get('tokens_seen', 0):,}, {val}, "
            f"{cfg['n_layers']} layers x {cfg['emb_dim']} dims, ctx {cfg['context_length']}")


def cmd_info(args):
    ckpt_dir = resolve_checkpoint(args.path, args.which)
    meta = read_meta(ckpt_dir)
    print(ckpt_dir)
    print(_summary(meta))
    shown = {k: v for k, v in meta.items() if k not in ("train_state", "metrics")}
    print(json.dumps(shown, indent=1))


def cmd_list(args):
    checkpoints = list_checkpoints(args.run)
    if not checkpoints:
        raise CheckpointError(f"{args.run} has no checkpoints (no {os.path.join(args.run, CHECKPOINTS, 'step-*')})")
    pointers = {}
    for name in POINTERS:
        link = os.path.join(args.run, CHECKPOINTS, name)
        if os.path.lexists(link):
            pointers.setdefault(os.path.normpath(_read_pointer(link)), []).append(name)
    for _, ckpt_dir in checkpoints:
        try:
            meta = read_meta(ckpt_dir)
            full = "resumable" if TRAIN_STATE_FILE in meta.get("files", {}) else "weights only"
            line = f"{_summary(meta)}, {full}"
        except CheckpointError as e:
            line = f"DAMAGED: {e}"
        tags = ",".join(pointers.get(os.path.normpath(ckpt_dir), []))
        print(f"{os.path.basename(ckpt_dir)}  {f'[{tags}] ' if tags else ''}{line}")


def add_info_command(subparsers):
    p = subparsers.add_parser("info", help="print a checkpoint's config, step and losses")
    p.add_argument("path", help="a checkpoint folder, or a run folder (then --which picks one)")
    p.add_argument("--which", default="best", help="in a run folder: best, latest or step-NNNNNNNN (default: best)")
    p.set_defaults(func=cmd_info)


def add_list_command(subparsers):
    p = subparsers.add_parser("list", help="list a run's checkpoints, which are latest/best, which are damaged")
    p.add_argument("run", help="a run folder (train.py --run-dir)")
    p.set_defaults(func=cmd_list)


# Each entry adds one subcommand; a new subcommand is a function appended here (see the bottom).
COMMANDS = [add_info_command, add_list_command]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")


# --- OpenAI GPT-2 weights <-> ours (from-hf / to-hf) ---
# OpenAI's GPT-2 is the book's model with qkv bias and a tied head, stored in the Hub's layout:
# `wte.weight`, `h.0.attn.c_attn.weight`, ... (with a `transformer.` prefix when transformers'
# GPT2LMHeadModel saved it). Its linear layers are `Conv1D`s, whose weights are (in, out), the
# transpose of nn.Linear's, and q/k/v are one fused `c_attn` matrix. `from-hf` turns such a file
# into a checkpoint of ours, so OpenAI's model is evaluated like one of our runs; `to-hf` goes back.
#
#     python checkpointing.py from-hf gpt2 checkpoints/gpt2           # downloads (cached) from the Hub
#     python checkpointing.py from-hf ~/Downloads/gpt2 checkpoints/gpt2  # a folder with model.safetensors
#     python checkpointing.py to-hf runs/gpt2/checkpoints/best hf/gpt2-ours

# OpenAI's four GPT-2s on the Hub (the short names are the ones people type).
HF_GPT2_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HF_WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"
# Every OpenAI GPT-2 has 64-dim heads (768/12, 1024/16, 1280/20, 1600/25): the head count of a
# weights file that comes without its config.json.
GPT2_HEAD_DIM = 64

# Per block: (our key, the Hub's key, Conv1D weight stored transposed?). q/k/v are handled apart.
_BLOCK_KEYS = [
    ("norm1.scale", "ln_1.weight", False), ("norm1.shift", "ln_1.bias", False),
    ("att.out_proj.weight", "attn.c_proj.weight", True), ("att.out_proj.bias", "attn.c_proj.bias", False),
    ("norm2.scale", "ln_2.weight", False), ("norm2.shift", "ln_2.bias", False),
    ("ff.layers.0.weight", "mlp.c_fc.weight", True), ("ff.layers.0.bias", "mlp.c_fc.bias", False),
    ("ff.layers.2.weight", "mlp.c_proj.weight", True), ("ff.layers.2.bias", "mlp.c_proj.bias", False),
]
_TOP_KEYS = [("tok_emb.weight", "wte.weight"), ("pos_emb.weight", "wpe.weight"),
             ("final_norm.scale", "ln_f.weight"), ("final_norm.shift", "ln_f.bias")]
_QKV = ("W_query", "W_key", "W_value")
# The Hub's GPT-2 files carry each layer's causal mask as a buffer; our attention builds its own.
_HF_MASK_RE = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def is_hf_source(source):
    """True if `source` is a GPT-2 in the Hub's layout (a .safetensors file, a folder holding the
    Hub's model.safetensors but no checkpoint.json of ours, or one of OpenAI's model names)."""
    if os.path.isfile(source):
        return not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(source)), META_FILE))
    if os.path.isdir(source):
        return (os.path.isfile(os.path.join(source, HF_WEIGHTS_FILE))
                and not os.path.isfile(os.path.join(source, META_FILE)))
    return source in HF_GPT2_MODELS


def hf_weights_path(source):
    """The local model.safetensors for SOURCE: that file, the one in that folder, or OpenAI's
    weights for a model name, downloaded once into the Hugging Face cache."""
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        path = os.path.join(source, HF_WEIGHTS_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(f"{source} has no {HF_WEIGHTS_FILE}; pass a folder or file holding "
                                  "the Hub's GPT-2 model.safetensors")
        return path
    if source not in HF_GPT2_MODELS:
        raise CheckpointError(f"{source} is not a file or folder, nor one of OpenAI's models "
                              f"({', '.join(HF_GPT2_MODELS)})")
    repo = HF_GPT2_MODELS[source]
    from huggingface_hub import hf_hub_download
    try:
        path = hf_hub_download(repo, HF_WEIGHTS_FILE)
        hf_hub_download(repo, HF_CONFIG_FILE)  # lands beside the weights, where hf_model_config looks
    except Exception as e:  # offline, proxy, Hub outage: all end the same way for the user
        raise CheckpointError(
            f"cannot download {source!r} from the Hugging Face Hub ({type(e).__name__}); on a machine "
            f"online fetch https://huggingface.co/{repo}/resolve/main/{HF_WEIGHTS_FILE} (and "
            f"{HF_CONFIG_FILE}) and pass that file or its folder instead of {source!r}") from None
    return path


def _strip_prefix(key):
    return key[len("transformer."):] if key.startswith("transformer.") else key


def _read_hf_config(weights_path):
    path = os.path.join(os.path.dirname(os.path.abspath(weights_path)), HF_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from None


def hf_model_config(weights_path, shapes):
    """Our model config for a Hub GPT-2, from its tensor shapes (name -> shape, prefix stripped)
    checked against the config.json beside the file when there is one."""
    if "wte.weight" not in shapes or "wpe.weight" not in shapes:
        raise CheckpointError(f"{weights_path} is not a GPT-2 in the Hub's layout (no wte.weight / wpe.weight)")
    vocab_size, emb_dim = shapes["wte.weight"]
    context_length = shapes["wpe.weight"][0]
    n_layers = len({k.split(".")[1] for k in shapes if re.match(r"^h\.\d+\.ln_1\.weight$", k)})
    hf = _read_hf_config(weights_path)
    for hf_key, value in (("vocab_size", vocab_size), ("n_embd", emb_dim), ("n_positions", context_length),
                          ("n_layer", n_layers)):
        if hf_key in hf and hf[hf_key] != value:
            raise CheckpointError(f"{HF_CONFIG_FILE} beside {weights_path} says {hf_key} {hf[hf_key]} but the "
                                  f"weights have {value}: the two files do not belong together")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{weights_path}: activation {hf['activation_function']!r} is not GPT-2's "
                              "tanh GELU, which our model uses")
    if hf.get("n_inner") not in (None, 4 * emb_dim):
        raise CheckpointError(f"{weights_path}: MLP width {hf['n_inner']} is not 4 x {emb_dim}, as ours is")
    n_heads = hf.get("n_head", emb_dim // GPT2_HEAD_DIM)
    if not n_heads or emb_dim % n_heads:
        raise CheckpointError(f"{weights_path}: cannot tell the number of heads; put the model's "
                              f"{HF_CONFIG_FILE} (with n_head) beside it")
    if "tie_word_embeddings" in hf:
        tied = bool(hf["tie_word_embeddings"])
    else:
        tied = "lm_head.weight" not in shapes
    return model_config("gpt2-small", vocab_size=vocab_size, context_length=context_length,
                        emb_dim=emb_dim, n_heads=n_heads, n_layers=n_layers, drop_rate=0.0,
                        qkv_bias=True, tie_weights=tied, init="gpt2")


def hf_to_ours(hf_state, cfg):
    """Our state dict from a Hub GPT-2 state dict (prefix stripped): transpose Conv1D weights,
    split the fused q/k/v, drop the causal-mask buffers; anything else left over is an error."""
    hf_state = dict(hf_state)
    take = lambda key: hf_state.pop(key).float()
    ours = {our: take(theirs) for our, theirs in _TOP_KEYS}
    emb = cfg["emb_dim"]
    for i in range(cfg["n_layers"]):
        ours_p, hf_p = f"trf_blocks.{i}.", f"h.{i}."
        for our, theirs, transposed in _BLOCK_KEYS:
            t = take(hf_p + theirs)
            ours[ours_p + our] = t.T.contiguous() if transposed else t
        qkv_w = take(hf_p + "attn.c_attn.weight").split(emb, dim=1)
        qkv_b = take(hf_p + "attn.c_attn.bias").split(emb)
        for name, w, b in zip(_QKV, qkv_w, qkv_b):
            ours[f"{ours_p}att.{name}.weight"] = w.T.contiguous()
            ours[f"{ours_p}att.{name}.bias"] = b.contiguous()
    head = hf_state.pop("lm_head.weight", None)
    if not cfg["tie_weights"]:
        if head is None:
            raise CheckpointError("config.json says the head is untied (tie_word_embeddings false) "
                                  "but the weights have no lm_head.weight")
        ours["out_head.weight"] = head.float()
    leftover = [k for k in hf_state if not _HF_MASK_RE.match(k)]
    if leftover:
        raise CheckpointError(f"unexpected tensors for a GPT-2: {', '.join(sorted(leftover)[:5])}"
                              f"{' ...' if len(leftover) > 5 else ''}")
    return ours


def model_from_hf(source):
    """(GPTModel in eval mode on the CPU, its source's weights path) for a Hub GPT-2 (see hf_weights_path)."""
    path = hf_weights_path(source)
    try:
        hf_state = {_strip_prefix(k): v for k, v in load_file(path).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    cfg = hf_model_config(path, {k: tuple(v.shape) for k, v in hf_state.items()})
    try:
        state = hf_to_ours(hf_state, cfg)
    except KeyError as e:
        raise CheckpointError(f"{path} is not a complete GPT-2: {e.args[0]} is missing") from None
    with torch.device("meta"):
        model = GPTModel(cfg)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: tensor shapes do not fit a GPT-2 of {cfg['n_heads']} heads: {e}") from None
    if cfg["tie_weights"]:
        model.out_head.weight = model.tok_emb.weight
    return model.eval(), path


def ours_to_hf(model):
    """The Hub's GPT2LMHeadModel state dict (`transformer.` keys) for our model; zero q/k/v biases
    where ours has none, and `lm_head.weight` only when the head is untied."""
    cfg, sd = model.cfg, {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    hf = {"transformer." + theirs: sd[our] for our, theirs in _TOP_KEYS}
    for i in range(cfg["n_layers"]):
        ours_p, hf_p = f"trf_blocks.{i}.", f"transformer.h.{i}."
        for our, theirs, transposed in _BLOCK_KEYS:
            hf[hf_p + theirs] = sd[ours_p + our].T if transposed else sd[ours_p + our]
        hf[hf_p + "attn.c_attn.weight"] = torch.cat([sd[f"{ours_p}att.{n}.weight"].T for n in _QKV], dim=1)
        hf[hf_p + "attn.c_attn.bias"] = torch.cat([
            sd.get(f"{ours_p}att.{n}.bias", torch.zeros(cfg["emb_dim"], dtype=sd["tok_emb.weight"].dtype))
            for n in _QKV])
    if not cfg["tie_weights"]:
        hf["lm_head.weight"] = sd["out_head.weight"]
    return {k: v.contiguous() for k, v in hf.items()}


def hf_config_json(cfg, dtype):
    """transformers' GPT2Config for our config, written by hand so exporting needs no transformers."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["context_length"],
        "n_embd": cfg["emb_dim"],
        "n_layer": cfg["n_layers"],
        "n_head": cfg["n_heads"],
        "n_inner": None,
        "activation_function": "gelu_new",  # the tanh GELU (gpt.GELU)
        "resid_pdrop": cfg["drop_rate"],
        "embd_pdrop": cfg["drop_rate"],
        "attn_pdrop": cfg["drop_rate"],
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": bool(cfg["tie_weights"]),
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(checkpoint, out_dir, which="best"):
    """Write our checkpoint as a transformers GPT-2 folder (config.json + model.safetensors), atomically."""
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not empty; pass a new folder")
    model, _ = load_model(checkpoint, "cpu", which)
    tensors = ours_to_hf(model)
    out_dir = os.path.abspath(out_dir)
    tmp = os.path.join(os.path.dirname(out_dir), f"{TMP_PREFIX}{os.path.basename(out_dir)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, HF_WEIGHTS_FILE), metadata={"format": "pt"})
    dtype = tensors["transformer.wte.weight"].dtype
    write_json_atomic(os.path.join(tmp, HF_CONFIG_FILE), hf_config_json(model.cfg, dtype))
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked above)
    os.rename(tmp, out_dir)
    return out_dir


def cmd_from_hf(args):
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
        raise CheckpointError(f"{args.out_dir} exists and is not empty; pass a new folder")
    model, path = model_from_hf(args.source)
    save_model(model, args.out_dir, {"source": "from-hf", "hf_source": args.source, "hf_file": os.path.abspath(path)})
    cfg = model.cfg
    print(f"{args.source} -> {args.out_dir}: {count_parameters(model):,} parameters, {cfg['n_layers']} layers "
          f"x {cfg['emb_dim']} dims, {cfg['n_heads']} heads, ctx {cfg['context_length']}, "
          f"{'tied' if cfg['tie_weights'] else 'untied'} head")


def cmd_to_hf(args):
    out_dir = export_hf(args.checkpoint, args.out_dir, args.which)
    print(f"{args.checkpoint} -> {out_dir} (load with transformers.GPT2LMHeadModel.from_pretrained)")


def add_from_hf_command(subparsers):
    p = subparsers.add_parser("from-hf", help="turn OpenAI's GPT-2 weights (Hub layout) into a checkpoint of ours")
    p.add_argument("source", help=f"a model name ({', '.join(HF_GPT2_MODELS)}; downloaded and cached), or a "
                                  "local model.safetensors in the Hub's layout, or the folder holding it "
                                  "(with its config.json)")
    p.add_argument("out_dir", help="the checkpoint folder to write (must not exist yet)")
    p.set_defaults(func=cmd_from_hf)


def add_to_hf_command(subparsers):
    p = subparsers.add_parser("to-hf", help="export a checkpoint as a transformers GPT-2 folder")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (then --which picks one)")
    p.add_argument("out_dir", help="the folder to write config.json + model.safetensors into (new or empty)")
    p.add_argument("--which", default="best", help="in a run folder: best, latest or step-NNNNNNNN (default: best)")
    p.set_defaults(func=cmd_to_hf)


COMMANDS += [add_from_hf_command, add_to_hf_command]


if __name__ == "__main__":
    main()
