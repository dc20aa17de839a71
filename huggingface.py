"""OpenAI's GPT-2 weights <-> ours, in the Hugging Face Hub's layout: from-hf and to-hf.

OpenAI's GPT-2 is the book's model with qkv bias and a tied head; the Hub's keys are `wte.weight`,
`h.0.attn.c_attn.weight`, ... (`transformer.`-prefixed from transformers), with Conv1D weights (nn.Linear's
transposed) and q/k/v fused. `from-hf` makes a checkpoint of ours; `to-hf` a folder transformers opens.
"""

import argparse
import json
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import cli
from checkpointing import (META_FILE, CheckpointError, add_checkpoint_arguments, folder_written_whole,
                           load_model, model_from_state, save_model)
from data import MANIFEST, manifest_digest
from files import write_json_atomic, write_text_atomic
from gpt import EOT_TOKEN, TOKENIZER_DIR, count_parameters, gpt2_bpe_files, model_config

# OpenAI's four GPT-2s on the Hub, by the short names people type.
HF_GPT2_MODELS = {n: f"openai-community/{n}" for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
HF_WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"
ENDOFTEXT = "<|endoftext|>"  # GPT-2's one special token (id EOT_TOKEN): its bos, eos and unk alike
# OpenAI's two BPE files (in TOKENIZER_DIR) under the names transformers' GPT-2 tokenizer reads.
BPE_FILES = (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt"))
CARD_LICENSE = "mit"  # the model card's license for the user's own weights (to-hf --license)
# The Hub datasets a run's data folder or input files are named after (download_fineweb.py's folders).
HUB_DATASETS = (("fineweb-edu", "HuggingFaceFW/fineweb-edu"), ("fineweb", "HuggingFaceFW/fineweb"))
# Every OpenAI GPT-2 has 64-dim heads (768/12, 1024/16, 1280/20, 1600/25): the head count of a
# weights file that comes without its config.json.
GPT2_HEAD_DIM = 64
PROBE_TIMEOUT = 10  # seconds to wait for the Hub before calling it unreachable

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


class HubError(Exception):
    """The Hub cannot be reached, or a download or upload failed (the message says what to do instead)."""


def is_hf_source(source):
    """True if `source` is a GPT-2 in the Hub's layout (a .safetensors file, a folder holding the
    Hub's model.safetensors but no checkpoint.json of ours, or one of OpenAI's model names)."""
    if os.path.isfile(source):
        return not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(source)), META_FILE))
    if os.path.isdir(source):
        return (os.path.isfile(os.path.join(source, HF_WEIGHTS_FILE))
                and not os.path.isfile(os.path.join(source, META_FILE)))
    return source in HF_GPT2_MODELS


def hub_unreachable_reason():
    """None when the Hugging Face Hub answers; else why not, in a few words. Asked once, in seconds,
    because huggingface_hub itself retries each request for half a minute, printing as it goes."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session
    if constants.HF_HUB_OFFLINE:
        return "the Hugging Face Hub is unreachable (HF_HUB_OFFLINE is set)"
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT)
    except Exception as e:  # any transport failure (DNS, refused, timeout, proxy) means the same thing here
        return (f"the Hugging Face Hub at {constants.ENDPOINT} is unreachable "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no reply'})")
    return None


def hub_file(repo, filename, hint, repo_type=None):
    """A file from the Hub: from the local cache if it is there, else downloaded once; unreachable,
    one HubError line that ends with `hint` (what to pass instead)."""
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo, filename, repo_type=repo_type, local_files_only=True)
    except Exception:  # not in the cache
        pass
    if reason := hub_unreachable_reason():
        raise HubError(f"{reason}; {hint}")
    try:
        return hf_hub_download(repo, filename, repo_type=repo_type)
    except Exception as e:  # proxy, outage, a moved file
        raise HubError(f"cannot download {filename} from the Hugging Face Hub ({type(e).__name__}); {hint}") from None


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
    hint = (f"on a machine online fetch https://huggingface.co/{repo}/resolve/main/{HF_WEIGHTS_FILE} (and "
            f"{HF_CONFIG_FILE}) and pass that file or its folder instead of {source!r}")
    path = hub_file(repo, HF_WEIGHTS_FILE, hint)
    hub_file(repo, HF_CONFIG_FILE, hint)  # lands beside the weights, where hf_model_config looks
    return path


def hf_model_config(weights_path, shapes):
    """Our model config for a Hub GPT-2, from its tensor shapes (name -> shape, prefix stripped)
    checked against the config.json beside the file when there is one."""
    if "wte.weight" not in shapes or "wpe.weight" not in shapes:
        raise CheckpointError(f"{weights_path} is not a GPT-2 in the Hub's layout (no wte.weight / wpe.weight)")
    vocab_size, emb_dim = shapes["wte.weight"]
    context_length = shapes["wpe.weight"][0]
    n_layers = len({k.split(".")[1] for k in shapes if re.match(r"^h\.\d+\.ln_1\.weight$", k)})
    path = os.path.join(os.path.dirname(os.path.abspath(weights_path)), HF_CONFIG_FILE)
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError:
        hf = {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from None
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
    if not isinstance(n_heads, int) or n_heads < 1 or emb_dim % n_heads:
        raise CheckpointError(f"{weights_path}: cannot tell the number of heads; put the model's "
                              f"{HF_CONFIG_FILE} (with n_head) beside it")
    tied = bool(hf["tie_word_embeddings"]) if "tie_word_embeddings" in hf else "lm_head.weight" not in shapes
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
        hf_state = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    cfg = hf_model_config(path, {k: tuple(v.shape) for k, v in hf_state.items()})
    try:
        state = hf_to_ours(hf_state, cfg)
    except KeyError as e:
        raise CheckpointError(f"{path} is not a complete GPT-2: {e.args[0]} is missing") from None
    return model_from_state(cfg, state, f"{path} (a GPT-2 of {cfg['n_heads']} heads)"), path


def load_any(spec, which="best", device="cpu"):
    """(GPTModel in eval mode on device, where it came from) for a checkpoint folder, a run folder
    (`which` picks its best, latest or step-N checkpoint) or a Hub GPT-2 (`gpt2`, a folder, a file)."""
    if is_hf_source(spec):
        model, path = model_from_hf(spec)
        return model.to(device), f"{spec} (OpenAI weights, {path})"
    if not os.path.exists(spec):
        raise CheckpointError(f"{spec} does not exist; pass a checkpoint folder, a run folder or one of "
                              f"{', '.join(HF_GPT2_MODELS)}")
    model, meta = load_model(spec, device, which)
    return model, meta["path"]


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
    drop = cfg["drop_rate"]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg["vocab_size"],
            "n_positions": cfg["context_length"], "n_embd": cfg["emb_dim"], "n_layer": cfg["n_layers"],
            "n_head": cfg["n_heads"], "n_inner": None,
            "activation_function": "gelu_new",  # the tanh GELU (gpt.GELU)
            "resid_pdrop": drop, "embd_pdrop": drop, "attn_pdrop": drop, "layer_norm_epsilon": 1e-5,
            "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": bool(cfg["tie_weights"]),
            "bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "use_cache": True,
            "dtype": str(dtype).removeprefix("torch.")}


def trained_on(meta):
    """The Hub datasets (HUB_DATASETS) the checkpoint's run trained on, for the card's metadata: named
    by the run's data folder (RUN/config.json) or, while that folder still holds the manifest the run
    recorded, by its input files. [] for a lone checkpoint or other data: the card then names none."""
    run_dir = os.path.dirname(os.path.dirname(meta.get("path", "")))  # RUN/checkpoints/step-N
    try:
        with open(os.path.join(run_dir, cli.CONFIG_FILE)) as f:
            dataset = json.load(f)["dataset"]
        names = [dataset["path"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    try:
        if manifest_digest(dataset["path"]) == dataset.get("manifest_sha256"):  # still the data the run saw
            with open(os.path.join(dataset["path"], MANIFEST)) as f:
                names.append(json.dumps(json.load(f).get("input")))
    except (OSError, ValueError):
        pass  # the data has moved since: its folder's name is all there is to go on
    text = " ".join(names).lower()  # fineweb-edu is looked for first: its name holds fineweb's
    return next(([repo] for word, repo in HUB_DATASETS if word in text), [])


def model_card(model, meta, repo=None, results=(), license_id=CARD_LICENSE, datasets=()):
    """README.md for the Hub: YAML metadata, then what the model is, how it was trained, its losses and
    how to use it. results: rows of `evaluate.py compare --json` for this checkpoint (loss per eval set,
    HellaSwag); datasets: the Hub datasets it was trained on (trained_on)."""
    cfg, training = model.cfg, meta.get("training", {})
    rows = [("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
            ("layers x width, heads, context", f"{cfg['n_layers']} x {cfg['emb_dim']}, {cfg['n_heads']}, "
                                                f"{cfg['context_length']}"),
            ("head, qkv bias, dropout", f"{'tied' if cfg['tie_weights'] else 'untied'}, {cfg['qkv_bias']}, "
                                        f"{cfg['drop_rate']}"),
            ("tokens trained", f"{meta.get('tokens_seen', 0):,}"), ("optimizer steps", f"{meta.get('step', 0):,}"),
            ("recipe", training.get("recipe", "?")), ("optimizer", training.get("optimizer", "?")),
            ("validation loss (its own val split)", f"{meta['val_loss']:.4f}" if meta.get("val_loss") else "-")]
    for r in results:
        rows.append((f"loss on {r.get('eval_set', 'its val split')}", f"{r['loss']:.4f} ({r['tokens']:,} tokens)"))
        if r.get("hellaswag"):
            rows.append(("HellaSwag acc_norm", f"{100 * r['hellaswag']['acc_norm']:.2f}% ({r['hellaswag']['n']:,} items)"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    name = repo or "FOLDER"
    front = (f"license: {license_id}\nlanguage:\n- en\nlibrary_name: transformers\npipeline_tag: text-generation\n"
             + ("datasets:\n" + "".join(f"- {d}\n" for d in datasets) if datasets else "")
             + "tags:\n- gpt2\n- text-generation\n")
    return (f"---\n{front}---\n\n# {repo or 'GPT-2-style model'}\n\n"
            "A GPT-2-small-sized base model trained from scratch with the book's model "
            "(\"Build a Large Language Model (From Scratch)\"), exported as a plain `GPT2LMHeadModel` with "
            "OpenAI's GPT-2 tokenizer: no custom code to trust.\n\n| | |\n|---|---|\n" + table + "\n\n"
            "```python\nfrom transformers import pipeline\n"
            f"generate = pipeline(\"text-generation\", model=\"{name}\")\n"
            "print(generate(\"Every effort moves you\", do_sample=False, max_new_tokens=20)[0][\"generated_text\"])\n"
            "```\n\n"
            f"```\nlm_eval --model hf --model_args pretrained={name} --tasks hellaswag\n```\n\n"
            "The tokenizer files (`vocab.json`, `merges.txt`) are OpenAI's GPT-2 byte-pair encoding, "
            "copyright (c) 2019 OpenAI, under OpenAI's modified MIT licence.\n")


def write_tokenizer_json(folder):
    """tokenizer.json, the fast tokenizer in one file, built from folder's vocab.json and merges.txt
    as transformers' GPT-2 converter builds it. Needs the `tokenizers` library: without it no file
    (transformers then builds the same tokenizer from the two files on loading)."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError:
        return
    bpe = models.BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    tokenizer.save(os.path.join(folder, "tokenizer.json"))


def export_hf(checkpoint, out_dir, which="best", repo=None, results=(), license_id=CARD_LICENSE):
    """Write our checkpoint as a transformers GPT-2 folder: model.safetensors, config.json,
    generation_config.json, the tokenizer files and a README.md model card, whole or not at all
    (written into a temporary folder beside out_dir, renamed into place at the end)."""
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not empty; pass a new folder")
    model, meta = load_model(checkpoint, "cpu", which)
    if model.cfg["vocab_size"] < EOT_TOKEN + 1:
        raise CheckpointError(f"{meta['path']} has a vocabulary of {model.cfg['vocab_size']:,} tokens, fewer than the "
                              f"GPT-2 tokenizer's {EOT_TOKEN + 1:,}, which the export ships: export a model trained "
                              "with it")
    try:
        bpe = gpt2_bpe_files(TOKENIZER_DIR)
    except RuntimeError as e:
        raise CheckpointError(str(e)) from None
    tensors = ours_to_hf(model)
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    docs = {HF_CONFIG_FILE: hf_config_json(model.cfg, tensors["transformer.wte.weight"].dtype),
            "generation_config.json": {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN},
            "special_tokens_map.json": special,
            # transformers' GPT-2 tokenizer (GPT2TokenizerFast when `tokenizers` is installed):
            "tokenizer_config.json": {
                "tokenizer_class": "GPT2Tokenizer", "model_max_length": model.cfg["context_length"],
                **special,
                "add_prefix_space": False,  # "Hello" and " Hello" stay two tokens, as tiktoken has them
                "add_bos_token": False,     # GPT-2 was trained without one, and so was ours
                "clean_up_tokenization_spaces": False,  # decode gives tiktoken's text, "a ." not "a."
                "errors": "replace"}}
    card = model_card(model, meta, repo, results, license_id, trained_on(meta))
    try:
        with folder_written_whole(out_dir) as tmp:
            save_file(tensors, os.path.join(tmp, HF_WEIGHTS_FILE), metadata={"format": "pt"})
            for name, doc in docs.items():
                write_json_atomic(os.path.join(tmp, name), doc)
            for ours, theirs in BPE_FILES:  # OpenAI's files, checked byte for byte, under transformers' names
                with open(os.path.join(tmp, theirs), "wb") as f:
                    f.write(bpe[ours])
            write_tokenizer_json(tmp)
            write_text_atomic(os.path.join(tmp, "README.md"), card)
    except OSError as e:
        raise CheckpointError(f"cannot write the export {out_dir} ({e.strerror or e}); nothing was written: "
                              "free some space or pass another folder") from None
    return os.path.abspath(out_dir)


# --- command line ---------------------------------------------------------------------------------

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
    if args.push and (reason := hub_unreachable_reason()):  # fail before doing anything else
        raise HubError(f"{reason}; export without --push and upload the folder later")
    results = []
    for path in args.results or []:
        try:
            with open(path) as f:
                results += json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"--results {path} is not the JSON of evaluate.py compare --json ({e})") from None
    out_dir = export_hf(args.checkpoint, args.out_dir, args.which, args.push, results, args.license)
    print(f"{args.checkpoint} -> {out_dir} (open with transformers' AutoTokenizer, AutoModelForCausalLM or "
          f"pipeline, or lm_eval --model hf --model_args pretrained={out_dir})")
    if not os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        print("no tokenizer.json (pip install tokenizers to write it): transformers builds it from "
              "vocab.json and merges.txt when it loads the folder")
    if args.push:  # the model repo is created if need be
        from huggingface_hub import HfApi
        try:
            HfApi().create_repo(args.push, exist_ok=True)
            HfApi().upload_folder(folder_path=out_dir, repo_id=args.push,
                                  commit_message="upload from huggingface.py to-hf")
        except Exception as e:  # no token, no rights, network
            raise HubError(f"uploading {out_dir} to {args.push} failed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); the export stays in {out_dir}: "
                           f"upload it later with: hf upload {args.push} {out_dir}") from None
        print(f"uploaded to https://huggingface.co/{args.push}")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("from-hf", help="turn OpenAI's GPT-2 weights (Hub layout) into a checkpoint of ours")
    p.add_argument("source", help=f"a model name ({', '.join(HF_GPT2_MODELS)}; downloaded once), or a "
                                  "model.safetensors in the Hub's layout, or its folder (with its config.json)")
    p.add_argument("out_dir", help="the checkpoint folder to write (new or empty)")
    p.set_defaults(func=cmd_from_hf)
    p = commands.add_parser("to-hf", help="export a checkpoint as a transformers GPT-2 folder, tokenizer included")
    add_checkpoint_arguments(p, "checkpoint")
    p.add_argument("out_dir", help="the folder to write (new or empty): weights, config, tokenizer, model card")
    p.add_argument("--results", nargs="+", metavar="FILE",
                   help="evaluate.py compare --json output(s) for this model, for the model card's table")
    p.add_argument("--push", metavar="REPO", help="then upload the folder to the Hub as model repo REPO (user/name; "
                                                  "needs a token: hf auth login or HF_TOKEN)")
    p.add_argument("--license", default=CARD_LICENSE,
                   help=f"the model card's Hub license id for your weights (mit, apache-2.0, other, ...; "
                        f"default: {CARD_LICENSE})")
    p.set_defaults(func=cmd_to_hf)
    return parser


def stopped(args):
    """The line a Ctrl-C or SIGTERM ends on: an output folder is whole or absent, never half-written."""
    if not os.path.isfile(os.path.join(args.out_dir, HF_WEIGHTS_FILE)):  # model.safetensors, ours or the Hub's
        return f"nothing was written to {args.out_dir}, and nothing half-written is left; run the command again"
    if args.command == "to-hf" and args.push:
        return (f"the export {args.out_dir} is whole but was not uploaded to {args.push}; upload it with: "
                f"hf upload {args.push} {args.out_dir}")
    return f"{args.out_dir} is written whole"


def main(argv=None):
    args = build_parser().parse_args(argv)
    with cli.errors_end_in_one_line(CheckpointError, HubError, stopped=lambda: stopped(args)):
        args.func(args)


if __name__ == "__main__":
    main()
