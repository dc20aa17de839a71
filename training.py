"""The training step, in one place: what train.py runs is exactly what the measure scripts time.
The optimizers are optim.py's; the batches come from data.py's BatchLoader."""

import contextlib
import dataclasses
import math
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import gpt
import optim
import reference
from recipes import RECIPES, STEP_DEFAULTS


PRECISIONS = ("fp32", "tf32", "fp16", "bf16")  # --precision's choices, in every script
AUTO_BATCH_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128)  # --batch-size auto tries these (that divide the step)
AUTO_BATCH_OFF_CUDA = 8          # without CUDA's memory accounting, auto takes this (or the largest that divides)
AUTO_BATCH_HEADROOM = 0.10       # of the GPU's memory left free after the probe: validation, fragmentation


def enabled_on(setting, device):
    """A true / false / "cuda" setting (torch.compile, fused AdamW) on this device: "cuda" means on
    when the run is on a GPU."""
    return setting is True or (setting == "cuda" and torch.device(device).type == "cuda")


def recipe_step(recipe, device):
    """The settings of train.py's step under a recipe (recipes.STEP_DEFAULTS under the recipe's own), as
    train.py resolves them on this device: for the scripts that time that step."""
    step = {**STEP_DEFAULTS, **{k: v for k, v in RECIPES[recipe].items() if k in STEP_DEFAULTS}}
    return {**step, "fused": enabled_on(step["fused"], device), "compile": enabled_on(step["compile"], device)}


class StopSignals:
    """SIGINT/SIGTERM set a flag, from start-up on: the loop finishes its step, saves and exits 0. A
    second Ctrl-C stops at once (KeyboardInterrupt), except while a checkpoint is being written."""

    def __init__(self):
        self.received, self.saving = None, False  # the signal's name once one came; a save in progress

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            if self.saving:
                print("still saving the checkpoint; it takes a few seconds", file=sys.stderr)
                return
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class RunState:
    """Where a run is (train.py's or a fine-tune's): every number of its progress, saved whole in each
    checkpoint's train_state and restored whole on resume."""
    step: int = 0                       # optimizer steps taken
    next_sequence: int = 0              # the first global sequence of the next step (train.py)
    tokens_seen: int = 0
    elapsed_s: float = 0.0              # wall clock of training and validation over every session
    best_val_loss: float | None = None
    best_step: int | None = None
    train_loss_sum: float = 0.0         # the steps' losses since the last validation (or chart point),
    train_loss_steps: int = 0           # and how many: a resume continues their average
    epoch: int = 0                      # a fine-tune: the epoch being trained (epochs finished, at its end)
    batch_in_epoch: int = 0             # and its batches done
    best_epoch: int | None = None
    stopped_early: bool = False         # --patience epochs without a new best: nothing more to do
    metrics: list = dataclasses.field(default_factory=list)  # one row per validation (metrics.jsonl)

    def progress(self):
        """Everything but the metrics rows (which the checkpoint keeps beside it)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "metrics"}

    @classmethod
    def from_checkpoint(cls, meta):
        """From a resumable checkpoint's meta: its train_state, and its metrics rows."""
        saved = meta["train_state"]  # also the optimizers' and scaler's, which restore_training_state takes
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__ if k in saved and k != "metrics"},
                   metrics=meta.get("metrics", []))

    def start_clock(self):
        self.clock = time.time()

    def tick(self):
        """Add the wall clock since the last tick to elapsed_s."""
        now = time.time()
        self.elapsed_s += now - self.clock
        self.clock = now


# --- precision --------------------------------------------------------------------------------------

class Precision:
    """One decision for the whole run: autocast dtype, GradScaler, TF32. fp16 (the RTX 3090 run's) is
    autocast + GradScaler, bf16 autocast alone, tf32 float32 with TF32 matmuls, fp32 plain float32. Off
    CUDA, fp16 and tf32 fall back to fp32 (`name` says what runs)."""

    def __init__(self, name, device):  # name: one of PRECISIONS, which every script's --precision offers
        self.device = device = torch.device(device)
        if device.type != "cuda" and name in ("fp16", "tf32"):
            name = "fp32"
        # bf16 tensor cores: Ampere (8.0) and newer. A V100 or T4 emulates bf16, far slower than its fp16.
        if name == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            raise ValueError(f"{torch.cuda.get_device_name(device)} has no native bf16 (it would be emulated, "
                             "very slowly); use --precision fp16")
        self.name = name
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name)
        self.use_scaler = name == "fp16"

    def apply(self):
        """TF32 for float32 matmuls on CUDA except in fp32 mode, through torch.set_float32_matmul_precision
        alone: it keeps the legacy and new flags in step, so the getter inductor reads still answers (the
        new fp32_precision flag alone makes it raise). Off CUDA nothing is set (oneDNN would take it)."""
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("highest" if self.name == "fp32" else "high")
        return self

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def scaler(self):
        return torch.amp.GradScaler(self.device.type, enabled=self.use_scaler)


def evaluation_precision(device):
    """The precision every validation loss is computed under, whatever the model was trained in, so
    that one model has one number in train.py's metrics and in evaluate.py: fp16 autocast on CUDA (as
    Giles Thomas computes his test loss; fp16 keeps 3 more mantissa bits than bf16), fp32 elsewhere.
    The loss itself is always reduced in fp32."""
    return Precision("fp16", device)


# --- the model as one compiled graph ----------------------------------------------------------------

def attention_context(device):
    """Makes SDPA prefer cuDNN's attention on Hopper (H100, H200), the fastest kernel torch ships
    there (FlashAttention-3 is a separate install); elsewhere torch's own order, flash first.
    Compiled graphs bake in the kernel chosen while they are traced, so training runs inside it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)


def compile_model(model, enabled):
    """The model (forward + loss, see GPTModel.forward's targets) as one fullgraph compiled module,
    shapes fixed (every micro-batch has the same shape, so nothing recompiles), or the model itself."""
    return torch.compile(model, fullgraph=True, dynamic=False) if enabled else model


DDP_BUCKET_MB = 100  # DDP's default is 25: gpt2-small in ~26 compiled pieces, not ~7 (docs/many-gpus.md)


def wrap_ddp(model, device, bucket_mb, grad_accum, compiled):
    """The (compiled) model in DistributedDataParallel, as train.py and the benchmarks run it: gradients
    written straight into DDP's buckets, and static_graph where it is valid: not with no_sync()
    accumulation (DDP's reducer asserts) nor with torch.compile (pytorch/pytorch#109261)."""
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=bucket_mb,
        gradient_as_bucket_view=True, static_graph=grad_accum == 1 and not compiled)


class TrainStep:
    """One optimizer step over `grad_accum` micro-batches, as train.py takes it. Returns (loss, grad norm)
    as device tensors: reading them is the caller's choice, so a bf16 step never waits for the GPU.
    The micro-batches are taken from the iterator one at a time, as each is needed: the loader holds only
    a few buffers, and taking a whole step's up front would make the host wait for the GPU."""

    def __init__(self, model, optimizers, precision, grad_accum, grad_clip, seed, distributed):
        self.model, self.optimizers, self.precision = model, optimizers, precision
        self.grad_accum, self.grad_clip, self.seed, self.distributed = grad_accum, grad_clip, seed, distributed
        self.scaler = precision.scaler()
        self.params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]

    def __call__(self, micro_batches):
        accum = self.grad_accum
        step_loss = torch.zeros((), device=self.precision.device)
        taken = 0
        for taken, (first, inputs, targets) in zip(range(1, accum + 1), micro_batches):
            # Dropout masks depend only on --seed and the micro-batch's sequences: the same after a
            # resume, with another number of GPUs, or with accumulation instead of DDP.
            torch.manual_seed((self.seed * 1_000_003 + first) % 2**63)
            # DDP all-reduces the gradients on the last micro-batch only
            with self.model.no_sync() if self.distributed and taken < accum else contextlib.nullcontext():
                with self.precision.autocast():
                    loss = self.model(inputs, targets=targets) / accum
                self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        if taken != accum:
            raise ValueError(f"a step of {accum} micro-batches was given {taken}")
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, norm)
        # GradScaler decides to skip an overflowing step per optimizer; with Muon + AdamW one could
        # step while the other skips (and clipping by an infinite norm zeroes every gradient), so an
        # overflow anywhere skips them all. The check syncs, as the scaler's own step already does.
        if not (self.scaler.is_enabled() and not torch.isfinite(norm)):
            for opt in self.optimizers:
                self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return step_loss, norm


@torch.inference_mode()
def validation_loss(model, stream, batch_size, context_length, num_batches, device, rank=0, world=1,
                    desc="validation"):
    """Mean cross-entropy over batches 0 .. num_batches-1 of a split (consecutive windows from its start),
    each batch's mean weighted equally, each rank taking every world-th batch, under evaluation_precision,
    summed in fp32 on the device and read once at the end: train.py's and evaluate.py's loss alike."""
    device = torch.device(device)
    precision = evaluation_precision(device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float32)
    starts = [k * batch_size for k in range(rank, num_batches, world)]
    loader = data.BatchLoader(stream, starts, batch_size, context_length, device)
    try:
        for _, inputs, targets in tqdm(loader, total=len(starts), desc=desc, leave=False, disable=rank != 0):
            with precision.autocast():
                total += model(inputs, targets=targets).float()
    finally:
        loader.close()
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return total.item() / num_batches


# --- batch layout ---------------------------------------------------------------------------------

class BatchLayoutError(ValueError):
    """A batch layout that cannot be had exactly (the message says what to change)."""


def batch_layout(batch_size, grad_accum, tokens_per_step, context_length, world):
    """(micro-batch B, accumulation A, sequences per step G = B x A x world), exactly as asked: --grad-accum
    as given (a recipe's tokens_per_step set aside), else tokens_per_step must be B x A x world x
    context_length for a whole A. A step of another size is refused, never rounded (llm.c asserts the
    same), so a run trains the batch it says it does."""
    T = context_length
    if grad_accum is not None or tokens_per_step is None:
        return batch_size, grad_accum or 1, batch_size * (grad_accum or 1) * world
    if tokens_per_step % T:
        raise BatchLayoutError(f"--tokens-per-step {tokens_per_step:,} is not a whole number of {T}-token "
                            f"sequences; use a multiple of {T}, e.g. {max(1, round(tokens_per_step / T)) * T:,}")
    sequences = tokens_per_step // T
    per_micro_step = batch_size * world
    if sequences % per_micro_step:
        fitting = [b for b in AUTO_BATCH_CANDIDATES if sequences % (b * world) == 0]
        hint = f"--batch-size {', '.join(map(str, fitting[-4:]))} or auto" if fitting else \
            "another --tokens-per-step or number of processes"
        raise BatchLayoutError(f"--tokens-per-step {tokens_per_step:,} is {sequences:,} sequences of {T} tokens, "
                            f"which {batch_size} per micro-batch x {world} process(es) = {per_micro_step} does "
                            f"not divide; choose {hint}")
    return batch_size, sequences // per_micro_step, sequences


def auto_batch_candidates(sequences_per_rank):
    """The micro-batches --batch-size auto may pick: AUTO_BATCH_CANDIDATES that divide a rank's
    sequences per step (all of them when accumulation is given directly: None)."""
    return [b for b in AUTO_BATCH_CANDIDATES if sequences_per_rank is None or sequences_per_rank % b == 0]


def largest_fitting(candidates, fits):
    """The largest candidate c (ascending order) with fits(c), trying each from the smallest and
    stopping at the first that does not fit (memory only grows with the batch). None if none fits."""
    best = None
    for candidate in candidates:
        if not fits(candidate):
            break
        best = candidate
    return best


def is_out_of_memory(exc):
    """CUDA's caching allocator raises torch.OutOfMemoryError; the CPU allocator, and cuBLAS when it
    cannot get a workspace, raise a RuntimeError that says so."""
    words = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed")
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in words))


def free_memory(device):
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def find_batch_size(model, candidates, context_length, precision, optimizer_state_bytes):
    """(batch size, how it was chosen) for --batch-size auto: on CUDA the largest candidate whose forward
    + backward fits beside the weights, gradients and `optimizer_state_bytes` (a ballast tensor), with
    AUTO_BATCH_HEADROOM left free, probed eagerly (compiled code needs less memory, so what fits here fits
    in training); elsewhere the largest candidate up to AUTO_BATCH_OFF_CUDA."""
    device = precision.device
    if device.type != "cuda":
        fitting = [c for c in candidates if c <= AUTO_BATCH_OFF_CUDA] or candidates[:1]
        return fitting[-1], f"auto: {fitting[-1]} (no GPU memory to measure on {device.type})"
    total = torch.cuda.get_device_properties(device).total_memory
    vocab = model.cfg["vocab_size"]

    def fits(batch_size):
        ballast = None
        try:
            ballast = torch.empty(optimizer_state_bytes, dtype=torch.uint8, device=device)
            torch.cuda.reset_peak_memory_stats(device)
            tokens = torch.randint(vocab, (batch_size, context_length + 1), device=device)
            with precision.autocast():
                loss = model(tokens[:, :-1], targets=tokens[:, 1:])
            loss.backward()
            torch.cuda.synchronize(device)
            ok = torch.cuda.max_memory_allocated(device) <= (1 - AUTO_BATCH_HEADROOM) * total
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            ok = False
        finally:
            model.zero_grad(set_to_none=True)
            del ballast
        free_memory(device)
        return ok

    was_training = model.training
    model.train()
    best = largest_fitting(candidates, fits)
    model.train(was_training)
    if best is None:
        raise BatchLayoutError(f"not even a micro-batch of {candidates[0]} x {context_length} tokens fits in "
                            f"{total / 2**30:.0f} GiB; try a shorter --context-length or a smaller --model")
    return best, f"auto: {best}, the largest of {candidates} that fits in {total / 2**30:.0f} GiB"


TOKENS_PER_PARAMETER = 20        # Chinchilla's ratio: the full-run estimate for models other than gpt2-small


def full_run_tokens(model_name, cfg):
    """Tokens a full run of this model takes: the RTX 3090 run's for its own model (gpt2-small at
    1,024), else 20 per parameter (Chinchilla), which is about the same for gpt2-small."""
    if model_name == "gpt2-small" and cfg == gpt.model_config("gpt2-small", drop_rate=cfg["drop_rate"]):
        return reference.TRAIN_TOKENS, "the RTX 3090 run's"
    with torch.device("meta"):
        params = gpt.count_parameters(gpt.GPTModel(cfg))
    return TOKENS_PER_PARAMETER * params, f"{TOKENS_PER_PARAMETER} per parameter for {params / 1e6:,.1f}M parameters"


CPU_MATMUL_FLOPS_FLOOR = 1e9  # fp32 matmul FLOP/s of the slowest CPU this could run on (a Raspberry Pi 4: ~10x it)


def cpu_training_seconds(cfg, tokens, warn_above):
    """Seconds this CPU would take to train `tokens`: the training FLOPs over half the speed of a large
    fp32 matmul here (a whole step, with its smaller matmuls, attention and optimizer, gets about half).
    A run that even the slowest CPU would finish within `warn_above` seconds gets that bound, untimed."""
    work = tokens * gpt.flops_per_token(cfg)
    if work / (0.5 * CPU_MATMUL_FLOPS_FLOOR) <= warn_above:
        return work / (0.5 * CPU_MATMUL_FLOPS_FLOOR)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b  # warm-up: thread pool and caches
    reps, begin = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - begin < 0.2:
        a @ b
        reps += 1
    matmul_flops = 2 * 1024**3 * reps / (time.perf_counter() - begin)
    return work / (0.5 * matmul_flops)


# --- timing the step (measure_tokens_per_second.py, measure_validation_timing.py, bench/gpu_check.py) --

def synchronize(device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


MAX_SCALER_WARMUP_STEPS = 30     # fp16: extra warm-up while the GradScaler is still backing off


def timed_steps(one_step, scaler, device, warmup_steps, min_steps, min_seconds):
    """(first step's seconds, timed steps, their seconds, last loss): the first step (which compiles)
    alone; then warmup_steps untimed (and, for fp16, more until the GradScaler keeps its scale, so
    skipped updates don't flatter the timing); then at least min_steps, for about min_seconds."""
    synchronize(device)
    begin = time.perf_counter()
    one_step()
    synchronize(device)
    compile_seconds = time.perf_counter() - begin
    for _ in range(warmup_steps):
        one_step()
    for _ in range(MAX_SCALER_WARMUP_STEPS if scaler.is_enabled() else 0):
        scale = scaler.get_scale()
        one_step()
        if scaler.get_scale() >= scale:
            break
    synchronize(device)
    begin = time.perf_counter()
    loss, _ = one_step()
    synchronize(device)
    # The count of timed steps is fixed now, from this step's time, and under torchrun agreed by all
    # ranks: a rank that watched its own clock could stop a step early and leave the others waiting
    # forever in DDP's all-reduce. The synchronize at the end puts the queued steps' time in.
    steps = max(min_steps, math.ceil(min_seconds / max(time.perf_counter() - begin, 1e-9)))
    if dist.is_initialized():
        agreed = torch.tensor([steps], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        steps = int(agreed.item())
    for _ in range(steps - 1):
        loss, _ = one_step()
    synchronize(device)
    return compile_seconds, steps, time.perf_counter() - begin, loss


def time_training(cfg, batch_size, precision, device, *, grad_accum, optimizer, fused, compile, grad_clip,
                  decay_matrices_only, shard_muon, zero1, seed, warmup_steps, min_steps, min_seconds, stream=None,
                  build_model=gpt.GPTModel):
    """A result row: TrainStep, the step train.py takes, timed (timed_steps) on a fresh model from
    build_model(cfg), with the RTX 3090 run's learning rates (they do not change a step's time).
    stream: a data.TokenStream for real batches; None: random tokens. Under torchrun every rank runs it,
    in DDP as train.py wraps it, tokens/s summed over the ranks. A setting that does not fit raises the
    allocator's error."""
    distributed = dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    device = torch.device(device)
    precision = Precision(precision, device).apply()
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    model = build_model(cfg).to(device).train()
    lr, decay = reference.LR, reference.WEIGHT_DECAY
    optimizers = optim.build_optimizers(model, lr, decay, (0.9, 0.999), decay_matrices_only, fused, optimizer, lr,
                                        decay, compile, shard_muon, zero1)
    step_model = compile_model(model, compile)
    if distributed:
        step_model = wrap_ddp(step_model, device, DDP_BUCKET_MB, grad_accum, compile)
    step = TrainStep(step_model, optimizers, precision, grad_accum, grad_clip, seed, distributed)
    B, T = batch_size, cfg["context_length"]
    stream = stream if stream is not None else data.RandomTokens(cfg["vocab_size"], seed)
    wrap = max(1, stream.num_sequences(T) - B + 1)  # real data: cycle through the split
    loader = data.BatchLoader(stream, ((((i * world + rank) * B) % wrap) for i in range(2**62)), B, T, device)
    try:
        with attention_context(device):
            compile_seconds, steps, seconds, loss = timed_steps(lambda: step(loader), step.scaler, device,
                                                                warmup_steps, min_steps, min_seconds)
    finally:
        loader.close()
    tokens_per_second = world * steps * grad_accum * B * T / seconds
    peak_flops = gpt.gpu_peak_flops(device)
    return {"batch_size": B, "grad_accum": grad_accum, "precision": precision.name, "optimizer": optimizer,
            "compile": compile, "tokens_per_second": tokens_per_second, "world_size": world,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "mfu": gpt.mfu(tokens_per_second, cfg, peak_flops * world if peak_flops else None),
            "seconds_per_step": seconds / steps, "timed_steps": steps, "timed_seconds": seconds,
            "compile_seconds": compile_seconds, "last_loss": loss.item()}
