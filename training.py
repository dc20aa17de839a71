"""The training step, in one place: what train.py runs is exactly what the measure scripts time.

How a batch becomes an update, read top to bottom:
    RECIPES            the named sets of defaults (the RTX 3090 run's, and "modern")
    Precision          autocast dtype, GradScaler and TF32 as one decision
    compile_model      the model with its loss inside, compiled as one graph
    Muon               torch.optim.Muon with its Newton-Schulz iteration compiled
    BatchLoader        reads the coming micro-batches on a thread into reused pinned buffers
    TrainStep          micro-steps with accumulation, gradient norm and clipping, optimizers, scaler
    validation_loss    the validation loss train.py records and the timing script times
    batch_geometry     micro-batch x accumulation x processes, refused when it does not divide
    find_batch_size    --batch-size auto: the largest micro-batch that fits, found once at start-up
"""

import contextlib
import functools
import math
import queue
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import gpt
import reference

# --recipe: sets of defaults for train.py (and measure_tokens_per_second.py); each flag still wins.
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
RECIPE_ALIASES = {"seed": "rtx3090"}  # the first round's name, still accepted


@functools.cache  # parse_args reads --recipe twice: the note once
def recipe_name(name):
    """--recipe's argparse type: the recipe's name, also when given by its first-round name (with a note)."""
    if name in RECIPE_ALIASES:
        print(f"note: --recipe {name} is now called --recipe {RECIPE_ALIASES[name]}", file=sys.stderr)
    return RECIPE_ALIASES.get(name, name)


def enabled_on(setting, device):
    """A true / false / "cuda" setting (torch.compile, fused AdamW) on this device: "cuda" means on
    when the run is on a GPU."""
    return setting is True or (setting == "cuda" and torch.device(device).type == "cuda")

AUTO_BATCH_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128)  # --batch-size auto tries these (that divide the step)
AUTO_BATCH_OFF_CUDA = 8          # without CUDA's memory accounting, auto takes this (or the largest that divides)
AUTO_BATCH_HEADROOM = 0.10       # of the GPU's memory left free after the probe: validation, fragmentation


# --- stopping cleanly ----------------------------------------------------------------------------

class StopSignals:
    """SIGINT/SIGTERM set a flag, from start-up on: the loop finishes its step, saves and exits 0. A
    second Ctrl-C stops at once (KeyboardInterrupt), except while a checkpoint is being written."""

    def __init__(self):
        self.received = None
        self.saving = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
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


# --- precision --------------------------------------------------------------------------------------

class Precision:
    """One decision for the whole run: autocast dtype, GradScaler, TF32.

    fp32  plain float32 (TF32 off)          tf32  float32 tensors, TF32 matmuls (CUDA)
    fp16  fp16 autocast + GradScaler (CUDA; the RTX 3090 run)     bf16  bf16 autocast, no scaler
    Off CUDA, fp16 and tf32 fall back to fp32 (`name` says what runs).
    """

    AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}

    def __init__(self, name, device):
        device = torch.device(device)
        self.device = device
        if name not in ("fp32", "tf32", "fp16", "bf16"):
            raise ValueError(f"unknown precision {name!r}; choose fp32, tf32, fp16 or bf16")
        if device.type != "cuda" and name in ("fp16", "tf32"):
            name = "fp32"
        if name == "bf16" and device.type == "cuda" and not gpt.has_native_bf16(device):
            raise ValueError(f"{torch.cuda.get_device_name(device)} has no native bf16 (it would be emulated, "
                             "very slowly); use --precision fp16")
        self.name = name
        self.dtype = self.AUTOCAST.get(name)
        self.use_scaler = name == "fp16"

    def apply(self):
        """TF32 for float32 matmuls on CUDA, except in fp32 mode. Set through
        torch.set_float32_matmul_precision alone, which keeps torch's legacy and new flags in step, so
        torch.get_float32_matmul_precision() (inductor reads it while choosing kernels) and
        torch.backends.cuda.matmul.allow_tf32 both still answer. Setting only the new
        backends.cuda.matmul.fp32_precision makes both raise ("mix of the legacy and new APIs").
        Off CUDA nothing is set: the setting would also reach oneDNN's CPU matmuls."""
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("highest" if self.name == "fp32" else "high")
        return self

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

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
    if not enabled:
        return model
    return torch.compile(model, fullgraph=True, dynamic=False)


DDP_BUCKET_MB = 100  # DDP's default is 25: ~26 buckets, so ~26 compiled pieces for gpt2-small's 650 MB of fp32
                     # gradients; 100 gives ~7, each still all-reduced while the rest of the backward runs


def wrap_ddp(model, device, bucket_mb=DDP_BUCKET_MB, grad_accum=1, compiled=False):
    """The (compiled) model in DistributedDataParallel, as train.py and the benchmarks run it: gradients
    written straight into DDP's buckets (no copy, no second buffer), and static_graph, which spares DDP
    its per-step search for unused parameters, where it is valid: not with no_sync() accumulation (DDP's
    reducer asserts) nor with torch.compile (it has clashed with dynamo's splitting of the graph at
    DDP's buckets, pytorch/pytorch#109261)."""
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=bucket_mb,
        gradient_as_bucket_view=True, static_graph=grad_accum == 1 and not compiled)


# --- Muon -------------------------------------------------------------------------------------------

def newton_schulz(update, coefficients, steps, eps):
    """The quintic Newton-Schulz iteration torch.optim.Muon uses (Keller Jordan's): approximately
    orthogonalises a matrix, in bf16. Written out here so it can be compiled into a few fused kernels."""
    a, b, c = coefficients
    x = update.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a*x + (b*G + c*G@G) @ x
    return x.T if tall else x


_compiled_newton_schulz = None


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update (same hyperparameters, same state, so checkpoints are interchangeable)
    with the Newton-Schulz iteration compiled when `compile_iteration` is set: 5 iterations x 3 matmuls
    on each of the 72 block matrices of gpt2-small, which eager mode runs as ~1,000 small kernels.

    Under DDP (with `shard`, the default) each of the N ranks orthogonalises every N-th matrix and
    all_gather hands the results to all: the iteration is 7-15% of a step at 8 GPUs when every rank
    repeats all of it (modded-nanogpt cut its step 14% this way). Every rank holds the same averaged
    gradients, and a matrix goes through the same kernels whichever rank takes it, so the update is
    the unsharded one, bit for bit."""

    def __init__(self, params, compile_iteration=False, shard=True, **kwargs):
        super().__init__(params, **kwargs)
        self.compile_iteration, self.shard = compile_iteration, shard

    @torch.no_grad()
    def step(self, closure=None):
        global _compiled_newton_schulz
        iterate = newton_schulz
        if self.compile_iteration:
            if _compiled_newton_schulz is None:
                _compiled_newton_schulz = torch.compile(newton_schulz, fullgraph=True, dynamic=False)
            iterate = _compiled_newton_schulz
        work = []  # (parameter, its group, its momentum update), in parameter order
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                work.append((p, group, p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf))
        orthogonal = self._orthogonalise(work, iterate)
        for (p, group, _), update in zip(work, orthogonal):
            rows, cols = p.shape
            scale = math.sqrt(max(1.0, rows / cols))  # adjust_lr_fn "original" (Keller Jordan's)
            if group["adjust_lr_fn"] == "match_rms_adamw":
                scale = 0.2 * math.sqrt(max(rows, cols))
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"] * scale)

    def _orthogonalise(self, work, iterate):
        """Newton-Schulz of each update: all here, or (sharded) matrices of one shape taken `world` at a
        time, rank r doing the r-th of each run, one asynchronous all_gather per run."""
        run = lambda item: iterate(item[2], item[1]["ns_coefficients"], item[1]["ns_steps"], item[1]["eps"])
        world = dist.get_world_size() if self.shard and dist.is_initialized() else 1
        if world == 1:
            return [run(item) for item in work]
        rank = dist.get_rank()
        results, pending = [None] * len(work), []
        by_shape = {}
        for i, (p, _, _) in enumerate(work):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        for shape, indices in by_shape.items():
            for start in range(0, len(indices), world):
                chunk = indices[start:start + world]
                # NCCL takes only contiguous tensors; newton_schulz hands back a transposed view for a
                # tall matrix (the MLP's 3072 x 768), so each result is laid out densely before sending.
                mine = run(work[chunk[rank]]).contiguous() if rank < len(chunk) else \
                    torch.zeros(shape, dtype=torch.bfloat16, device=work[chunk[0]][0].device)
                gathered = [torch.empty(shape, dtype=torch.bfloat16, device=mine.device) for _ in range(world)]
                pending.append(dist.all_gather(gathered, mine, async_op=True))
                for i, g in zip(chunk, gathered):
                    results[i] = g
        for handle in pending:
            handle.wait()
        return results


# --- ZeRO-1 -----------------------------------------------------------------------------------------

class ZeroAdamW(torch.optim.AdamW):
    """AdamW with its state sharded across the ranks (ZeRO stage 1): each parameter belongs to one rank,
    chosen to balance the elements, which alone keeps its two moments and steps it; the new values are
    then broadcast, one flat tensor per rank. Gradients stay DDP's, whole on every rank.

    The param groups hold every parameter, so the LR schedule, GradScaler and clipping see one AdamW.
    state_dict() gathers the whole state into the unsharded AdamW's form (every rank must call it,
    together) and load_state_dict() keeps this rank's share: a checkpoint resumes on any number of
    GPUs, sharded or not. torch's ZeroRedundancyOptimizer does the same job but moves its state
    between ranks pickled; this moves tensors only."""

    def __init__(self, params, rank, world, **kwargs):
        super().__init__(params, **kwargs)
        self.rank, self.world = rank, world
        self.params_in_order = [p for group in self.param_groups for p in group["params"]]
        loads, self.owner = [0] * world, {}
        for p in sorted(self.params_in_order, key=lambda p: -p.numel()):  # largest first onto the lightest rank
            r = loads.index(min(loads))
            self.owner[p] = r
            loads[r] += p.numel()
        self.owned = [[p for p in self.params_in_order if self.owner[p] == r] for r in range(world)]

    @torch.no_grad()
    def step(self, closure=None):
        others = [(p, p.grad) for p in self.params_in_order if self.owner[p] != self.rank]
        for p, _ in others:
            p.grad = None  # AdamW skips a parameter without a gradient, and makes it no state
        try:
            loss = super().step(closure)
        finally:
            for p, grad in others:
                p.grad = grad
        for r, params in enumerate(self.owned):
            if params:
                flat = torch.cat([p.detach().reshape(-1) for p in params])
                dist.broadcast(flat, src=r)
                if r != self.rank:
                    for p, value in zip(params, torch._utils._unflatten_dense_tensors(flat, params)):
                        p.copy_(value)
        return loss

    def state_dict(self):
        doc = super().state_dict()
        device = self.params_in_order[0].device
        has_state = torch.tensor([float(i in doc["state"]) for i in range(len(self.params_in_order))], device=device)
        dist.all_reduce(has_state, op=dist.ReduceOp.MAX)  # which parameters have been stepped, on their owners
        state = {}
        for i, p in enumerate(self.params_in_order):
            if not has_state[i]:
                continue
            mine = doc["state"][i] if self.owner[p] == self.rank else None
            entry = {}
            for key in ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.defaults["amsgrad"] else ()):
                if mine is not None:
                    value = mine[key].to(p.device)
                else:
                    value = torch.zeros((), dtype=torch.float32, device=p.device) if key == "step" else torch.zeros_like(p)
                dist.broadcast(value, src=self.owner[p])
                entry[key] = value.cpu() if key == "step" else value
            state[i] = entry
        return {"state": state, "param_groups": doc["param_groups"]}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for p in list(self.state):
            if self.owner[p] != self.rank:
                del self.state[p]


def build_optimizers(model, lr, weight_decay, betas=(0.9, 0.999), decay_matrices_only=False, fused=False,
                     optimizer="adamw", muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0,
                     compile_muon=False, shard_muon=True, zero1=False):
    """The run's optimizers as a list, stepped and checkpointed together (gpt.configure_optimizers
    picks which parameter goes where); Muon's iteration is compiled with the model and, under DDP,
    shared out across the ranks; with zero1 (and several ranks) AdamW's state is sharded too."""
    muon = lambda params, **kw: Muon(params, compile_iteration=compile_muon, shard=shard_muon, **kw)
    adamw = torch.optim.AdamW
    if zero1 and dist.is_initialized() and dist.get_world_size() > 1:
        adamw = functools.partial(ZeroAdamW, rank=dist.get_rank(), world=dist.get_world_size())
    return gpt.configure_optimizers(model, lr, weight_decay, betas, decay_matrices_only, fused, optimizer,
                                    muon_lr, muon_momentum, muon_weight_decay, muon_class=muon, adamw_class=adamw)


# --- data -------------------------------------------------------------------------------------------

def seed_dropout(seed, first_sequence):
    """Dropout masks depend only on the random seed (--seed) and which sequences are in the micro-batch, so they are
    the same after a resume, with another number of GPUs, or with accumulation instead of DDP."""
    torch.manual_seed((seed * 1_000_003 + first_sequence) % 2**63)


class BatchLoader:
    """(first_sequence, inputs, targets) for each first sequence in `starts`, in order, on `device`.

    A thread reads ahead: each micro-batch's B*T+1 tokens come out of the memory-mapped shards into
    one of `depth` pinned int32 buffers, reused in turn; the copy to the GPU is asynchronous and the
    buffer is refilled only after its copy has finished (a CUDA event says when). So reading the
    disk, copying and the GPU's work overlap, and no step waits for the data or pins fresh memory.
    """

    def __init__(self, stream, starts, batch_size, context_length, device, depth=4):
        self.stream, self.B, self.T, self.device = stream, batch_size, context_length, torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        n = batch_size * context_length + 1
        with torch.inference_mode(False):  # the reading thread writes them, outside any inference mode
            self.buffers = [torch.empty(n, dtype=torch.int32, pin_memory=self.on_cuda) for _ in range(depth)]
        self.copied = [None] * depth      # the CUDA event of each buffer's last copy to the device
        self.free, self.ready = queue.Queue(), queue.Queue(maxsize=depth)
        for slot in range(depth):
            self.free.put(slot)
        self.stopping = False
        self.thread = threading.Thread(target=self._read, args=(iter(starts),), daemon=True)
        self.thread.start()

    def _read(self, starts):
        try:
            for first in starts:
                slot = self.free.get()
                if self.stopping:
                    return
                if self.copied[slot] is not None:
                    self.copied[slot].synchronize()
                tokens = self.stream.read(first * self.T, self.B * self.T + 1)
                self.buffers[slot].copy_(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int32)))
                self.ready.put((first, slot))
                if self.stopping:
                    return
            self.ready.put(None)
        except BaseException as exc:  # handed to the training loop, which raises it
            self.ready.put(exc)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.ready.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        first, slot = item
        if self.on_cuda:
            # The copy runs on the current stream of *this* GPU, and the event must be recorded on that
            # same stream: recorded on another device's stream it completes at once, and the reading
            # thread would refill a buffer still being copied.
            stream = torch.cuda.current_stream(self.device)
            tokens = self.buffers[slot].to(self.device, non_blocking=True)
            self.copied[slot] = torch.cuda.Event()
            self.copied[slot].record(stream)
        else:
            tokens = self.buffers[slot].clone().to(self.device)
        self.free.put(slot)
        B, T = self.B, self.T
        return first, tokens[:-1].view(B, T).long(), tokens[1:].view(B, T).long()

    def close(self):
        """Stop the reading thread and wait for it: a thread still copying into a tensor while the
        interpreter exits makes torch abort the process."""
        self.stopping = True
        self.free.put(0)  # wake the thread if it waits for a buffer
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                while True:  # and if it waits to hand one over
                    self.ready.get_nowait()
            self.thread.join(timeout=0.05)


def micro_batch_starts(first_step_sequence, num_steps, sequences_per_step, rank, batch_size, grad_accum):
    """The first sequence of every micro-batch this rank reads, step by step: step s owns global
    sequences [s*G, (s+1)*G), and micro-step m of rank r takes the block at (r*A + m)*B inside it."""
    for step in range(num_steps):
        start = first_step_sequence + step * sequences_per_step
        for micro in range(grad_accum):
            yield start + (rank * grad_accum + micro) * batch_size


# --- the step ---------------------------------------------------------------------------------------

class TrainStep:
    """One optimizer step over `grad_accum` micro-batches, as train.py takes it:

    for each micro-batch: seeded dropout, forward with the loss inside (autocast), loss / A,
    backward (DDP synchronises gradients on the last micro-batch only); then unscale (fp16), the
    global gradient norm, clipping, the optimizers' steps (all skipped together when fp16
    overflowed), the scaler's update and zeroed gradients. Returns (loss, grad norm) as device
    tensors: reading them is the caller's choice, so a bf16 step never waits for the GPU.

    The micro-batches are taken from the iterator one at a time, as each is needed: the loader holds
    only a few buffers, and asking for all of a step's batches up front would make the host wait for
    the GPU to finish with the first ones before it could queue the rest.
    """

    def __init__(self, model, optimizers, precision, grad_accum, grad_clip=0.0, seed=0, distributed=False):
        self.model, self.optimizers, self.precision = model, optimizers, precision
        self.grad_accum, self.grad_clip, self.seed, self.distributed = grad_accum, grad_clip, seed, distributed
        self.scaler = precision.scaler()
        self.params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]

    def __call__(self, micro_batches):
        accum = self.grad_accum
        step_loss = torch.zeros((), device=self.precision.device)
        taken = 0
        for i, (first, inputs, targets) in zip(range(accum), micro_batches):
            seed_dropout(self.seed, first)
            last = i == accum - 1
            sync = self.model.no_sync() if self.distributed and not last else contextlib.nullcontext()
            with sync:
                with self.precision.autocast():
                    loss = self.model(inputs, targets=targets) / accum
                self.scaler.scale(loss).backward()
            step_loss += loss.detach()
            taken += 1
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


# --- validation -------------------------------------------------------------------------------------

@torch.inference_mode()
def validation_loss(model, stream, batch_size, context_length, num_batches, device, rank=0, world=1,
                    desc="validation"):
    """Mean cross-entropy over batches 0 .. num_batches-1 of a split (consecutive windows from its
    start), each batch's mean weighted equally, each rank taking every world-th batch, under
    evaluation_precision, summed in fp32 on the device and read once at the end. train.py, evaluate.py
    and measure_validation_timing.py all call this."""
    device = torch.device(device)
    precision = evaluation_precision(device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float32)
    starts = [k * batch_size for k in range(rank, num_batches, world)]
    loader = BatchLoader(stream, starts, batch_size, context_length, device)
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


# --- batch geometry ---------------------------------------------------------------------------------

class GeometryError(ValueError):
    """A batch geometry that cannot be had exactly (the message says what to change)."""


def batch_geometry(batch_size, grad_accum, tokens_per_step, context_length, world):
    """(micro-batch B, accumulation A, sequences per step G = B x A x world), exactly as asked.

    --grad-accum, when given, is taken as it is (and a recipe's tokens_per_step is set aside). Else
    tokens_per_step must be B x A x world x context_length for a whole A: a step of another size is
    refused, never rounded (llm.c asserts the same), so a run trains the batch it says it does.
    """
    T = context_length
    if grad_accum is not None or tokens_per_step is None:
        A = grad_accum or 1
        return batch_size, A, batch_size * A * world
    if tokens_per_step % T:
        raise GeometryError(f"--tokens-per-step {tokens_per_step:,} is not a whole number of {T}-token "
                            f"sequences; use a multiple of {T}, e.g. {max(1, round(tokens_per_step / T)) * T:,}")
    sequences = tokens_per_step // T
    per_micro_step = batch_size * world
    if sequences % per_micro_step:
        fitting = [b for b in AUTO_BATCH_CANDIDATES if sequences % (b * world) == 0]
        hint = f"--batch-size {', '.join(map(str, fitting[-4:]))} or auto" if fitting else \
            "another --tokens-per-step or number of processes"
        raise GeometryError(f"--tokens-per-step {tokens_per_step:,} is {sequences:,} sequences of {T} tokens, "
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
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        words in message for words in ("out of memory", "can't allocate memory", "cublas_status_alloc_failed"))


def free_memory(device):
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def find_batch_size(model, candidates, context_length, precision, optimizer_state_bytes):
    """--batch-size auto on CUDA: the largest candidate micro-batch whose forward + backward fits
    beside the weights, their gradients and `optimizer_state_bytes` (held by a ballast tensor while
    probing), with AUTO_BATCH_HEADROOM of the GPU left free. The probe runs eagerly: compiled code
    needs less memory than eager, so what fits here fits in training. Off CUDA: the largest of the
    candidates up to AUTO_BATCH_OFF_CUDA. Returns (batch size, how it was chosen)."""
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
        raise GeometryError(f"not even a micro-batch of {candidates[0]} x {context_length} tokens fits in "
                            f"{total / 2**30:.0f} GiB; try a shorter --context-length or a smaller --model")
    return best, f"auto: {best}, the largest of {candidates} that fits in {total / 2**30:.0f} GiB"


def optimizer_state_bytes(model, optimizer):
    """Bytes of optimizer state a run will hold: AdamW keeps two fp32 moments per parameter; with
    Muon the blocks' matrices keep one momentum buffer instead."""
    params = list(model.parameters())
    total = sum(2 * p.numel() * 4 for p in params)
    if optimizer == "muon":
        muon = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("trf_blocks."))
        total -= muon * 4
    return total


TOKENS_PER_PARAMETER = 20        # Chinchilla's ratio: the full-run estimate for models other than gpt2-small


def full_run_tokens(model_name, cfg):
    """Tokens a full run of this model takes: the RTX 3090 run's for its own model (gpt2-small at
    1,024), else 20 per parameter (Chinchilla), which is about the same for gpt2-small."""
    if model_name == "gpt2-small" and cfg == gpt.model_config("gpt2-small", drop_rate=cfg["drop_rate"]):
        return reference.TRAIN_TOKENS, "the RTX 3090 run's"
    with torch.device("meta"):
        params = gpt.count_parameters(gpt.GPTModel(cfg))
    return TOKENS_PER_PARAMETER * params, f"{TOKENS_PER_PARAMETER} per parameter for {params / 1e6:,.1f}M parameters"



def cpu_training_seconds(cfg, tokens):
    """Seconds this CPU would take to train `tokens`, estimated before a run starts: the model's training
    FLOPs per token over the speed of a large fp32 matmul here, of which a whole training step (with its
    smaller matmuls, attention and optimizer) gets about half."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b  # warm-up: thread pool and caches
    reps, begin = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - begin < 0.2:
        a @ b
        reps += 1
    matmul_flops = 2 * 1024**3 * reps / (time.perf_counter() - begin)
    return tokens * gpt.flops_per_token(cfg) / (0.5 * matmul_flops)


# --- timing the step (measure_tokens_per_second.py, measure_validation_timing.py, bench/gpu_check.py) --

class RandomTokens:
    """A stand-in for a data.TokenStream of random tokens (timing does not depend on their values)."""

    def __init__(self, vocab_size, seed=123, num_tokens=2**40):
        self.vocab_size, self.seed, self.num_tokens, self.split = vocab_size, seed, num_tokens, "random"

    def read(self, start, count):
        rng = np.random.default_rng([self.seed, start])
        return rng.integers(0, self.vocab_size, count, dtype=np.int32)

    def num_sequences(self, context_length):
        return (self.num_tokens - 1) // context_length


def synchronize(device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


MIN_TIMED_SECONDS = 10.0         # of timed steps per measurement, after warm-up (fewer on request, e.g. tests)
MAX_SCALER_WARMUP_STEPS = 30     # fp16: extra warm-up while the GradScaler is still backing off


def time_training(cfg, batch_size, precision, device, *, grad_accum=1, optimizer="adamw", fused=None,
                  compile=False, grad_clip=0.0, decay_matrices_only=False, stream=None, build_model=gpt.GPTModel,
                  warmup_steps=3, min_steps=1, min_seconds=MIN_TIMED_SECONDS, seed=123, shard_muon=True, zero1=False):
    """Time TrainStep, the step train.py takes, on a fresh model: returns a result row (dict).

    The first step (which compiles, when compile is on) is timed on its own as compile_seconds; then
    warmup_steps untimed steps (and, for fp16, more until the GradScaler keeps its scale, so skipped
    updates don't flatter the timing); then steps are timed until at least min_steps and min_seconds.
    stream: a data.TokenStream for real batches read as training reads them; None: random tokens.
    build_model(cfg): the model (bench/gpu_check.py passes one with the book's attention).
    Under torchrun (a process group is up) every rank runs it: the model in DDP as train.py wraps it,
    each rank its own batches, tokens/s summed over the ranks (the steps are in lockstep).
    Learning rates do not change a step's time; these are the RTX 3090 run's. Raises the allocator's
    error when the setting does not fit.
    """
    distributed = dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    device = torch.device(device)
    precision = Precision(precision, device).apply()
    fused = device.type == "cuda" if fused is None else fused
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    model = build_model(cfg).to(device)
    model.train()
    optimizers = build_optimizers(model, reference.LR, reference.WEIGHT_DECAY, (0.9, 0.999), decay_matrices_only, fused, optimizer,
                                  compile_muon=compile, shard_muon=shard_muon, zero1=zero1)
    step_model = compile_model(model, compile)
    if distributed:
        step_model = wrap_ddp(step_model, device, grad_accum=grad_accum, compiled=compile)
    step = TrainStep(step_model, optimizers, precision, grad_accum, grad_clip, seed, distributed=distributed)
    B, T = batch_size, cfg["context_length"]
    stream = stream if stream is not None else RandomTokens(cfg["vocab_size"], seed)
    wrap = max(1, stream.num_sequences(T) - B + 1)  # real data: cycle through the split
    starts = ((((i * world + rank) * B) % wrap) for i in range(2**62))
    loader = BatchLoader(stream, starts, B, T, device)

    def one_step():
        return step(loader)

    try:
        with attention_context(device):
            synchronize(device)
            begin = time.perf_counter()
            one_step()
            synchronize(device)
            compile_seconds = time.perf_counter() - begin
            for _ in range(warmup_steps):
                one_step()
            for _ in range(MAX_SCALER_WARMUP_STEPS if step.scaler.is_enabled() else 0):
                scale = step.scaler.get_scale()
                one_step()
                if step.scaler.get_scale() >= scale:
                    break
            synchronize(device)
            begin, steps = time.perf_counter(), 0
            # The GPU may trail the clock by the few steps queued ahead of it; the synchronize at the
            # end puts their time in, so steps / seconds is exact, whatever the loop's last check saw.
            while steps < min_steps or time.perf_counter() - begin < min_seconds:
                loss, _ = one_step()
                steps += 1
            synchronize(device)
            seconds = time.perf_counter() - begin
    finally:
        loader.close()

    tokens_per_second = world * steps * grad_accum * B * T / seconds
    peak_flops = gpt.gpu_peak_flops(device)
    return {
        "batch_size": B,
        "grad_accum": grad_accum,
        "precision": precision.name,
        "optimizer": optimizer,
        "compile": compile,
        "tokens_per_second": tokens_per_second,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "world_size": world,
        "mfu": gpt.mfu(tokens_per_second, cfg, peak_flops * world if peak_flops else None),
        "seconds_per_step": seconds / steps,
        "timed_steps": steps,
        "timed_seconds": seconds,
        "compile_seconds": compile_seconds,
        "last_loss": loss.item(),
    }
