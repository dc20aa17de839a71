"""The optimizers, together: which parameter each one steps (build_optimizers), Muon, ZeRO-1
(ZeroAdamW), and the memory they hold (optimizer_state_bytes, for --batch-size auto)."""

import functools
import math

import torch
import torch.distributed as dist


# --- the run's optimizers ---------------------------------------------------------------------------

def is_hidden_matrix(name, param):
    """The transformer blocks' 2-D weights (attention and MLP): Muon's, under --optimizer muon."""
    return param.dim() == 2 and name.startswith("trf_blocks.")


def build_optimizers(model, lr, weight_decay, betas, decay_matrices_only, fused, optimizer, muon_lr,
                     muon_weight_decay, compile_muon, shard_muon, zero1):
    """The run's optimizers as a list, stepped and checkpointed together; every param group carries
    "base_lr", the peak the LR schedule scales. optimizer "adamw" without decay_matrices_only is the RTX
    3090 run's (and the book's): torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1).
    decay_matrices_only decays only 2-D weights, as GPT-2 and nanoGPT do: pulling a norm's scale towards
    0 is no regulariser. "muon": Muon for the blocks' hidden matrices at muon_lr; AdamW at `lr` keeps the
    embeddings, the head, norms and biases, which an orthogonalised update does not suit."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    to_muon = [p for n, p in named if optimizer == "muon" and is_hidden_matrix(n, p)]
    rest = [p for n, p in named if not (optimizer == "muon" and is_hidden_matrix(n, p))]
    if decay_matrices_only:
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": rest, "weight_decay": weight_decay}]
    groups = [{**g, "base_lr": lr} for g in groups if g["params"]]
    adamw = torch.optim.AdamW
    if zero1 and dist.is_initialized() and dist.get_world_size() > 1:
        adamw = functools.partial(ZeroAdamW, rank=dist.get_rank(), world=dist.get_world_size())
    optimizers = [adamw(groups, lr=lr, betas=betas, fused=fused or None)]
    if optimizer == "muon":
        optimizers.append(Muon([{"params": to_muon, "base_lr": muon_lr}], lr=muon_lr,
                               weight_decay=muon_weight_decay, compile_iteration=compile_muon, shard=shard_muon))
    return optimizers


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
    on each of gpt2-small's 72 block matrices are ~1,000 small kernels in eager mode. With `shard`
    (--shard-muon, docs/many-gpus.md) each of N ranks orthogonalises every N-th matrix and all_gather
    shares the results: every rank holds the same gradients and runs the same kernels on a matrix, so
    the update is the unsharded one, bit for bit."""

    def __init__(self, params, *, compile_iteration, shard, **kwargs):
        super().__init__(params, **{**kwargs, "adjust_lr_fn": "original"})  # what step() scales by, always
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
    """AdamW with its state sharded across the ranks (ZeRO stage 1, --zero1): each parameter's owner,
    chosen to balance the elements, alone keeps its moments and steps it, then broadcasts it. The param
    groups hold every parameter, so the LR schedule, GradScaler and clipping see one AdamW. state_dict()
    gathers the unsharded AdamW's form (every rank calls it, together) and load_state_dict() keeps this
    rank's share: a checkpoint resumes on any number of GPUs. torch's ZeroRedundancyOptimizer moves its
    state between ranks pickled; this moves tensors only."""

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
                value = mine[key].to(p.device) if mine is not None else \
                    torch.zeros((), device=p.device) if key == "step" else torch.zeros_like(p)
                dist.broadcast(value, src=self.owner[p])
                entry[key] = value.cpu() if key == "step" else value
            state[i] = entry
        return {"state": state, "param_groups": doc["param_groups"]}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for p in list(self.state):
            if self.owner[p] != self.rank:
                del self.state[p]


def optimizer_state_bytes(model, optimizer):
    """Bytes of optimizer state a run will hold: AdamW keeps two fp32 moments per parameter; with
    Muon the blocks' matrices keep one momentum buffer instead."""
    muon = sum(p.numel() for n, p in model.named_parameters() if optimizer == "muon" and is_hidden_matrix(n, p))
    return 8 * sum(p.numel() for p in model.parameters()) - 4 * muon
