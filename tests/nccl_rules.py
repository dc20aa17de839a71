"""Run a script with every torch.distributed collective held to NCCL's rules, on gloo.

    python tests/nccl_rules.py train.py --data ... (what torchrun starts in tests/test_distributed.py)

Gloo is lenient where NCCL is not: gloo flattens a non-contiguous tensor itself, while NCCL refuses it
("Tensors must be contiguous"), and NCCL hangs or corrupts memory when ranks disagree on a call's
dtype or size or call collectives in another order. So a multi-process run that passes on the CPU
proves nothing about the GPU unless each collective is checked as NCCL would see it. Here each call
is checked before it runs:
  - on this rank: every tensor is contiguous and dense (strided), all of one dtype, and all_gather's
    outputs have the input's shape;
  - across the ranks (their signatures all-gathered first, on the call's own group): the same
    collective, with the same dtypes and sizes, in the same order.
A broken rule raises NCCLRuleError on every rank at once (the local verdict travels with the
signature, so no rank is left waiting in a collective the others never reach).
"""

import functools
import os
import runpy
import sys

import torch
import torch.distributed as dist

CHECKED = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
           "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier")
MAX_TENSORS = 16  # per call in a signature (all_gather's outputs count: one per rank)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]


class NCCLRuleError(RuntimeError):
    """A collective that NCCL would refuse, or that would hang it."""


def tensors_in(args, kwargs):
    """The tensors a call hands to the collective, inputs and outputs, in argument order."""
    found = []
    for value in list(args) + [v for k, v in kwargs.items() if k != "group"]:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
            found.extend(value)
    return found


def local_problem(name, args, tensors):
    """What NCCL would refuse in this call on this rank, or None."""
    for t in tensors:
        if t.layout != torch.strided:
            return f"{name}: a {t.layout} tensor (NCCL takes dense tensors only)"
        if not t.is_contiguous():
            return (f"{name}: a tensor of shape {tuple(t.shape)} with strides {t.stride()} is not contiguous "
                    "(NCCL: 'Tensors must be contiguous')")
    if len({t.dtype for t in tensors}) > 1:
        return f"{name}: tensors of several dtypes {sorted(str(t.dtype) for t in tensors)} in one call"
    if name == "all_gather" and len(args) >= 2 and isinstance(args[0], (list, tuple)):
        if any(out.shape != args[1].shape for out in args[0]):
            return f"{name}: outputs of shapes {[tuple(o.shape) for o in args[0]]} for an input of {tuple(args[1].shape)}"
    return None


def signature(name, tensors, problem):
    """The call as integers: [problem?, which collective, count, (dtype, numel) per tensor ...]."""
    sig = [int(problem is not None), CHECKED.index(name), len(tensors)]
    for t in tensors[:MAX_TENSORS]:
        sig += [DTYPES.index(t.dtype) if t.dtype in DTYPES else len(DTYPES), t.numel()]
    return sig + [-1] * (3 + 2 * MAX_TENSORS - len(sig))


def describe(sig):
    shown = [(str(DTYPES[d]) if d < len(DTYPES) else "other", n) for d, n in zip(sig[3::2], sig[4::2]) if n >= 0]
    return f"{CHECKED[sig[1]]} of {sig[2]} tensor(s) {shown}"


def checked(name, original, gather):
    @functools.wraps(original)
    def call(*args, **kwargs):
        tensors = tensors_in(args, kwargs)
        problem = local_problem(name, args, tensors)
        mine = torch.tensor(signature(name, tensors, problem), dtype=torch.int64)
        group = kwargs.get("group")
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        gather(everyone, mine, group=group)
        if problem:
            raise NCCLRuleError(problem)
        if any(sig[0] for sig in everyone):
            raise NCCLRuleError(f"another rank broke a rule in {name}; see its error")
        if any(not torch.equal(sig, mine) for sig in everyone):
            calls = "; ".join(f"rank {r}: {describe(sig.tolist())}" for r, sig in enumerate(everyone))
            raise NCCLRuleError(f"the ranks disagree on a collective (NCCL would hang or mix data): {calls}")
        return original(*args, **kwargs)
    return call


def install():
    """Replace torch.distributed's collectives by checked ones (each still runs the real one)."""
    gather = dist.all_gather
    for name in CHECKED:
        setattr(dist, name, checked(name, getattr(dist, name), gather))


if __name__ == "__main__":
    install()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` would have it
    runpy.run_path(script, run_name="__main__")
