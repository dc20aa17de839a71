"""The GPT model from "Build a Large Language Model (From Scratch)", the GPT-2 tokenizer, and generation.

The classes, their names and their state-dict keys are the book's (`tok_emb.weight`,
`trf_blocks.0.att.W_query.weight`, ...), so the book's weights load unchanged. What is new is off by
default (`tie_weights`, `init: "gpt2"`, as OpenAI's GPT-2 has them), or happens at compute time only
(SDPA attention, fused QKV, padded head, the loss in forward: docs/speed.md), or in `generate` (a KV
cache).
"""

import functools
import hashlib
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# The book's GPT-2 small config, as Giles Thomas trained it on his RTX 3090: untied head, no qkv bias,
# 163,009,536 parameters.
GPT2_SMALL = {
    "vocab_size": 50257,     # the GPT-2 BPE vocabulary
    "context_length": 1024,  # GPT-2's context
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,       # the book leaves it out; OpenAI's GPT-2 had it
}

# Keys the book's config does not have; these defaults reproduce the book's model.
CONFIG_DEFAULTS = {
    "tie_weights": False,  # True: out_head.weight is tok_emb.weight (OpenAI's GPT-2)
    "init": "pytorch",     # "pytorch" (the book) or "gpt2" (normal 0.02, scaled residual projections)
}

# OpenAI's shapes for the larger GPT-2s (the book's model_configs), and a tiny one for CPU tests.
PRESETS = {
    "gpt2-small": GPT2_SMALL,
    "gpt2-medium": {**GPT2_SMALL, "emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large": {**GPT2_SMALL, "emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl": {**GPT2_SMALL, "emb_dim": 1600, "n_layers": 48, "n_heads": 25},
    "tiny": {**GPT2_SMALL, "context_length": 128, "emb_dim": 64, "n_layers": 2, "n_heads": 4},
}

EOT_TOKEN = 50256  # <|endoftext|>: separates documents in the training stream
VOCAB_PAD_MULTIPLE = 128  # the output head's matmul runs on the vocabulary padded to this (GPTModel.head)

# tiktoken's published sha256 of OpenAI's two GPT-2 BPE files (tiktoken_ext/openai_public.py).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_BPE_FILES = {"encoder.json": GPT2_ENCODER_JSON_SHA256, "vocab.bpe": GPT2_VOCAB_BPE_SHA256}
# Each config key's type: a checkpoint.json edited by hand is refused (check_config), not half-built.
CONFIG_TYPES = {**{k: int for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")},
                "drop_rate": float, "qkv_bias": bool, "tie_weights": bool, "init": str}


def model_config(preset="gpt2-small", **overrides):
    """A full config dict: a preset, the optional keys' defaults, then any overrides (None = keep)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = {**PRESETS[preset], **CONFIG_DEFAULTS}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return check_config(cfg)


def check_config(cfg):
    """cfg if GPTModel can build it, else ValueError naming the first key it could not."""
    for key, kind in CONFIG_TYPES.items():
        if not is_a(cfg.get(key), kind):
            raise ValueError(f"{key} is {cfg.get(key)!r}, not {kind.__name__}")
        if kind is int and cfg[key] < 1:
            raise ValueError(f"{key} is {cfg[key]}, not a positive number")
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise ValueError(f"emb_dim {cfg['emb_dim']} must be divisible by n_heads {cfg['n_heads']}")
    if cfg["init"] not in ("pytorch", "gpt2"):
        raise ValueError(f"init must be 'pytorch' or 'gpt2', not {cfg['init']!r}")
    if not 0 <= cfg["drop_rate"] < 1:
        raise ValueError(f"drop_rate must be in [0, 1), not {cfg['drop_rate']}")
    return cfg


def is_a(value, kind):
    """isinstance for values read from JSON: a bool is not a number, and an int is a float too."""
    if isinstance(value, bool) and kind is not bool:
        return False
    return isinstance(value, (int, float) if kind is float else kind)


class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        # F.layer_norm is the book's mean / biased-variance formula, as one fused kernel.
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class GELU(nn.Module):
    def forward(self, x):
        # The tanh approximation GPT-2 was trained with (the book's formula).
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), GELU(),
                                    nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]))

    def forward(self, x):
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        # The book keeps a causal-mask buffer and an nn.Dropout; SDPA does both inside its kernel.
        self.dropout = dropout

    def forward(self, x, kv_cache=None):
        """x: (batch, tokens, d_in). kv_cache: None, or a dict this layer reads and extends."""
        b, num_tokens, _ = x.shape
        # One matmul for queries, keys and values: the three weights stacked at compute time (a
        # (3*d_out, d_in) copy, tiny next to the activations), so the parameters keep the book's names.
        weight = torch.cat([self.W_query.weight, self.W_key.weight, self.W_value.weight])
        biases = [self.W_query.bias, self.W_key.bias, self.W_value.bias]
        bias = torch.cat(biases) if biases[0] is not None else None
        qkv = F.linear(x, weight, bias).view(b, num_tokens, 3, self.num_heads, self.head_dim)
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, heads, tokens, head_dim)

        if kv_cache is not None:
            if "k" in kv_cache:
                keys = torch.cat([kv_cache["k"], keys], dim=2)
                values = torch.cat([kv_cache["v"], values], dim=2)
            kv_cache["k"], kv_cache["v"] = keys, values

        # Causal masking: a query may look at keys up to its own position. With cached keys a
        # single new query sits after all of them, so it may see everything (no mask).
        is_causal = queries.shape[2] == keys.shape[2]
        if not is_causal and queries.shape[2] != 1:
            raise ValueError("with a KV cache, feed either the whole prompt or one token at a time")
        context = F.scaled_dot_product_attention(queries, keys, values, is_causal=is_causal,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(context.transpose(1, 2).reshape(b, num_tokens, self.d_out))


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(d_in=cfg["emb_dim"], d_out=cfg["emb_dim"],
                                      context_length=cfg["context_length"], num_heads=cfg["n_heads"],
                                      dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x, kv_cache=None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg = {**CONFIG_DEFAULTS, **cfg}
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if cfg["init"] == "gpt2":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            # GPT-2 paper: scale the weights of layers that write into the residual stream by
            # 1/sqrt(N), N = number of residual additions (two per block), so its variance stays put.
            for block in self.trf_blocks:
                for proj in (block.att.out_proj, block.ff.layers[2]):
                    nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * cfg["n_layers"]))
        if cfg["tie_weights"]:
            self.out_head.weight = self.tok_emb.weight

    def set_dropout(self, drop_rate):
        """Every dropout at drop_rate: the nn.Dropout layers and the attention weights' (a float that
        SDPA takes), and the config that a checkpoint saves, so a reloaded model drops the same."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = drop_rate
            elif isinstance(module, MultiHeadAttention):
                module.dropout = drop_rate
        self.cfg["drop_rate"] = drop_rate
        return self

    def forward(self, in_idx, kv_caches=None, targets=None):
        """in_idx: (batch, tokens) token ids -> logits (batch, tokens, vocab); with targets (the next token
        ids, -100 for none), the mean cross-entropy in float32 instead, computed here so that torch.compile
        fuses it with the head (docs/speed.md). kv_caches: one dict per block (see `generate`)."""
        batch_size, seq_len = in_idx.shape
        start = kv_caches[0]["k"].shape[2] if kv_caches and "k" in kv_caches[0] else 0
        if start + seq_len > self.cfg["context_length"]:
            raise ValueError(f"{start + seq_len} tokens exceed the context length {self.cfg['context_length']}")
        pos = torch.arange(start, start + seq_len, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))
        for i, block in enumerate(self.trf_blocks):
            x = block(x, kv_caches[i] if kv_caches is not None else None)
        logits = self.head(self.final_norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def head(self, x):
        """out_head(x), the vocabulary padded to a multiple of VOCAB_PAD_MULTIPLE for the matmul only (50,257
        rows give misaligned tiles; the book's appendix D: 112k -> 127k tokens/s on an A100). The
        parameter keeps its 50,257 rows, and the padded logits are sliced off before anything sees them."""
        weight = self.out_head.weight
        vocab = weight.shape[0]
        pad = -vocab % VOCAB_PAD_MULTIPLE
        if pad:
            weight = F.pad(weight, (0, 0, 0, pad))
        return F.linear(x, weight)[..., :vocab]

    def load_state_dict(self, state_dict, strict=True, assign=False):
        # The book's attention kept a persistent causal mask (`trf_blocks.N.att.mask`); ours is
        # computed inside SDPA, so drop those buffers when loading the book's weights.
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".att.mask")}
        if self.cfg["tie_weights"] and "out_head.weight" not in state_dict and "tok_emb.weight" in state_dict:
            state_dict["out_head.weight"] = state_dict["tok_emb.weight"]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def count_parameters(model):
    """Distinct parameters: a tied head counts once, as in the GPT-2 paper's 124M."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg):
    """Training FLOPs per token (forward + backward), the PaLM paper's appendix B estimate:
    6 * N + 12 * n_layers * emb_dim * context_length. N counts the weights of every matrix multiply
    (embeddings are lookups, norms and biases negligible); the second term is attention's QK^T and AV."""
    d, n_layers, ctx, vocab = cfg["emb_dim"], cfg["n_layers"], cfg["context_length"], cfg["vocab_size"]
    matmul_params = n_layers * 12 * d * d + d * vocab
    return 6 * matmul_params + 12 * n_layers * d * ctx


# Dense bf16/fp16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets (V100, T4: fp16, no bf16). The first
# pattern found in the device name wins, so specific names come first ("H100 PCIe" before a bare H100, an
# SXM or GH200); \b keeps "A10" off "A100" and "A10G", "L4" off "L40S". A MIG slice has no peak: its share
# is not in its name.
GPU_PEAK_TFLOPS = [
    (r"MIG", None), (r"H100.*PCIe", 756), (r"H100.*NVL", 835), (r"H100", 989), (r"H200.*NVL", 835),
    (r"H200", 989), (r"A100", 312), (r"L40S", 362), (r"\bL4\b", 121), (r"\bA10\b", 125), (r"V100", 125),
    (r"\bT4\b", 65), (r"RTX 4090", 165), (r"RTX 4080", 97), (r"RTX 3090 Ti", 80), (r"RTX 3090", 71),
    (r"RTX 3080", 59), (r"A6000", 155),
]


def peak_flops_for_name(gpu_name):
    """The dense bf16/fp16 tensor peak in FLOP/s for a GPU name, or None if it is not in the table."""
    return next((tflops * 1e12 if tflops else None for pattern, tflops in GPU_PEAK_TFLOPS
                 if re.search(pattern, gpu_name)), None)


def gpu_peak_flops(device):
    """Peak FLOP/s of a CUDA device for MFU, or None (CPU, or a GPU not in GPU_PEAK_TFLOPS)."""
    device = torch.device(device)
    return peak_flops_for_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def mfu(tokens_per_second, cfg, peak_flops):
    """Model FLOPs utilisation: achieved training FLOP/s over the GPU's peak (None without a peak)."""
    return tokens_per_second * flops_per_token(cfg) / peak_flops if peak_flops else None


class DeviceError(ValueError):
    """--device names a device this machine does not have (the message says what to pass)."""


def resolve_device(name="auto"):
    """torch.device for --device: "auto" picks CUDA, then Apple's MPS, then the CPU; a device this
    machine does not have is a DeviceError. A CUDA device becomes the process's current device here:
    streams, events and kernels that name no device then land on it, not on cuda:0."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            return torch.device("mps")
        elif unused_gpu := nvidia_gpu_torch_cannot_use():
            raise DeviceError(unused_gpu)
        else:
            return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(nvidia_gpu_torch_cannot_use() or f"--device {name} but torch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"--device {name} but torch sees {torch.cuda.device_count()} GPU(s); use cuda:0 ..")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name} but MPS is not available; use --device cpu")
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    return device


# The oldest NVIDIA driver (Linux) each CUDA build of torch runs on, newest build first: CUDA 13 needs
# 580; CUDA 12.x runs on 525 and later through minor-version compatibility (NVIDIA's CUDA release notes).
TORCH_CUDA_BUILDS = (("cu130", 580), ("cu128", 570), ("cu126", 525))


def nvidia_smi():
    """(name, driver version) of the first NVIDIA GPU as nvidia-smi reports it; (None, None) without one."""
    import subprocess
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return tuple(part.strip() for part in out[0].rsplit(",", 1)) if out and "," in out[0] else (None, None)


def nvidia_gpu_torch_cannot_use():
    """One line naming the GPU, driver, torch build and the install that fixes it, when nvidia-smi shows
    a GPU that torch cannot use (usually a PyPI torch built for a newer CUDA than the driver: torch then
    quietly sees no GPU). Else None."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return None  # GPUs hidden on purpose
    gpu, driver = nvidia_smi()
    if gpu is None:
        return None
    major = int(driver.split(".")[0]) if driver.split(".")[0].isdigit() else None
    fitting = next((tag for tag, oldest in TORCH_CUDA_BUILDS if major is not None and major >= oldest), None)
    needed = dict(TORCH_CUDA_BUILDS).get(f"cu{(torch.version.cuda or '').replace('.', '')}")
    if torch.version.cuda is None:
        why = "is a CPU-only build"
    elif needed and major is not None and major < needed:
        why = f"is built for CUDA {torch.version.cuda}, which needs driver {needed} or newer"
    else:
        why = f"(CUDA {torch.version.cuda}) cannot reach it (is CUDA_VISIBLE_DEVICES set?)"
    if major is not None and fitting is None:
        fix = f"update the NVIDIA driver to {TORCH_CUDA_BUILDS[-1][1]} or newer, then reinstall torch"
    else:
        fix = f"pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/{fitting or 'cu126'}"
    return (f"this machine has {gpu} (driver {driver}) but torch {torch.__version__} {why}; fix: {fix} "
            "(or pass --device cpu to run on the CPU on purpose)")


# --- the book's own attention, as the RTX 3090 run trained it (speed and memory comparisons) -----------

class BookMultiHeadAttention(MultiHeadAttention):
    """The book's causal multi-head attention, as the RTX 3090 run trained it: scores as an explicit
    (tokens x tokens) matrix per head, masked with a stored upper-triangular buffer, softmax, dropout."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x, kv_cache=None):
        if kv_cache is not None:
            raise ValueError("the book's attention has no KV cache")
        b, num_tokens, _ = x.shape
        heads = lambda t: t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries, keys, values = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        scores = queries @ keys.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        # The book's nn.Dropout(p) is F.dropout(x, p, training); a float p as in MultiHeadAttention.
        weights = F.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1), self.dropout, self.training)
        context = (weights @ values).transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context)


def book_attention_model(cfg):
    """A GPTModel whose blocks use the book's attention (same weights and keys, plus the mask buffers)."""
    model = GPTModel(cfg)
    for block in model.trf_blocks:
        book = BookMultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                                      cfg["n_heads"], cfg["qkv_bias"])
        missing, unexpected = book.load_state_dict(block.att.state_dict(), strict=False)
        assert missing == ["mask"] and not unexpected, (missing, unexpected)
        block.att = book
    return model


# --- generation -----------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None,
             use_cache=True):
    """The book's generate: greedy at temperature 0, else top-k filtering then temperature sampling.
    idx: (batch, tokens) prompt ids; returned with up to `max_new_tokens` appended (fewer once every
    row produced `eos_id`). With the KV cache each new token is one single-token forward; once the text
    outgrows `context_size` the window slides (as in the book), so the cache is rebuilt from it."""
    was_training = model.training
    model.eval()
    caches = None
    for _ in range(max_new_tokens):
        window = idx[:, -context_size:]
        if not use_cache:
            logits = model(window)
        elif caches is not None and idx.shape[1] <= context_size:
            logits = model(idx[:, -1:], caches)
        else:
            caches = [{} for _ in model.trf_blocks]
            logits = model(window, caches)
        logits = logits[:, -1, :]

        if top_k is not None:
            top_logits, _ = torch.topk(logits, top_k)
            logits = torch.where(logits < top_logits[:, -1:], torch.full_like(logits, -torch.inf), logits)
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)

        idx = torch.cat((idx, idx_next), dim=1)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            break
    model.train(was_training)
    return idx


def text_to_token_ids(text, tokenizer):
    return torch.tensor(tokenizer.encode(text, allowed_special={"<|endoftext|>"})).unsqueeze(0)


# --- tokenizer ------------------------------------------------------------------------------------

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")  # OpenAI's two GPT-2 BPE files


def gpt2_bpe_files(data_dir):
    """{name: bytes} of OpenAI's two GPT-2 BPE files in data_dir, each checked against its sha256
    (RuntimeError naming the file otherwise): the tokenizer and an export both read them through this."""
    found = {}
    for name, expected in GPT2_BPE_FILES.items():
        path = os.path.join(data_dir, name)
        try:
            with open(path, "rb") as f:
                found[name] = f.read()
        except OSError as e:
            raise RuntimeError(f"cannot read {path} ({e.strerror}); restore it with: git checkout -- tokenizer/") from None
        actual = hashlib.sha256(found[name]).hexdigest()
        if actual != expected:
            raise RuntimeError(f"{path} is not OpenAI's GPT-2 BPE file (sha256 {actual}, expected {expected}); "
                               "restore it with: git checkout -- tokenizer/")
    return found


@functools.cache
def get_tokenizer(data_dir=TOKENIZER_DIR):
    """tiktoken's GPT-2 encoding, built from OpenAI's BPE files shipped in tokenizer/: tiktoken's own
    get_encoding("gpt2") downloads them on first use, which fails or hangs on an offline GPU machine.
    They are checked against tiktoken's published sha256, so the token ids are exactly tiktoken's."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    gpt2_bpe_files(data_dir)
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=os.path.join(data_dir, "vocab.bpe"),
                                            encoder_json_file=os.path.join(data_dir, "encoder.json"))
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens={ENDOFTEXT: EOT_TOKEN})
