"""Several processes (torchrun, gloo on the CPU) against one process: Muon's orthogonalisation shared
out across the ranks, AdamW's state sharded (ZeRO-1), and a run resumed on another number of processes.

Muon sharded is compared with Muon unsharded on the same processes, bit for bit. AdamW is compared
with one process accumulating the same micro-batches, to float tolerance. Muon cannot be compared
that way beyond a step or two: DDP averages gradients in another order than accumulation sums them,
and Newton-Schulz blows up last-bit differences in the directions of the update's small singular
values (it maps them all to about 1), so two correct runs drift apart within a few steps."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import checkpointing as ckpt
import optim
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NCCL_RULES = os.path.join(REPO, "tests", "nccl_rules.py")
STEPS = 6
# 8 sequences a step in micro-batches of 2: 4 processes x 1, 2 processes accumulating 2, or 1 accumulating
# 4; the same micro-batches each time, so the same dropout masks too (they are seeded per micro-batch).
COMMON = ["--model", "tiny", "--context-length", "32", "--val-batches", "2", "--device", "cpu", "--lr", "1e-3",
          "--batch-size", "2", "--tokens-per-step", str(8 * 32), "--val-every", "3", "--max-steps", str(STEPS)]


def args(data, run, *extra):
    return ["--data", data, "--run-dir", str(run), *COMMON, *extra]


def torchrun(processes, argv, script="train.py"):
    """`script` on `processes` gloo processes, every collective held to NCCL's rules (tests/nccl_rules.py)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), NCCL_RULES, script, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def weights(run):
    return load_file(os.path.join(ckpt.resolve_checkpoint(str(run), "latest"), ckpt.MODEL_FILE))


def train_state(run):
    return load_file(os.path.join(ckpt.resolve_checkpoint(str(run), "latest"), ckpt.TRAIN_STATE_FILE))


def assert_close(a, b):
    """Equal up to float reduction order, tensor by tensor (relative Frobenius norm): per element, Adam
    moves a weight whose gradient is at rounding level (a rare token's embedding row) by about +-lr
    either way, while a lost optimizer state or a wrong batch moves every weight."""
    assert a.keys() == b.keys()
    for key in a:
        difference = torch.linalg.norm(a[key] - b[key]) / torch.linalg.norm(b[key])
        assert difference < 1e-5, f"{key}: relative difference {difference:.2e}"


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_sharded_muon_with_zero1_is_the_unsharded_update_bit_for_bit(tiny_dataset, tmp_path):
    """On 4 processes, not 2: the tiny model's 2 matrices of each MLP shape fill half a run of 4, so two
    ranks send zeros to the all_gather. 2 processes would take only full runs."""
    processes, sharded, unsharded = 4, tmp_path / "sharded", tmp_path / "unsharded"
    # --batch-size auto: the ranks agree on the micro-batch through a collective too (the smallest found)
    muon = ["--optimizer", "muon", "--max-steps", "3", "--batch-size", "auto"]
    torchrun(processes, args(tiny_dataset, sharded, *muon, "--shard-muon", "--zero1"))
    torchrun(processes, args(tiny_dataset, unsharded, *muon, "--no-shard-muon", "--no-zero1"))
    assert_equal(weights(sharded), weights(unsharded))  # every matrix went through the same kernels
    assert_equal(train_state(sharded), train_state(unsharded))  # ZeRO-1 saved AdamW's whole state, unsharded
    settings = json.load(open(sharded / "config.json"))["training"]
    assert (settings["batch_size_requested"], settings["batch_size"]) == ("auto", 8 // processes)


@pytest.fixture(scope="module")
def on_two(tiny_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("two") / "run"
    torchrun(2, args(tiny_dataset, run, "--zero1"))
    return run


@pytest.mark.slow
def test_zero1_ends_where_one_process_accumulating_the_same_micro_batches_ends(tiny_dataset, on_two, tmp_path):
    """2 processes here; 4 in the next test, which continues this run on them and must end here too."""
    one = tmp_path / "one"
    train.main(args(tiny_dataset, one))
    assert_close(weights(on_two), weights(one))
    settings = json.load(open(on_two / "config.json"))["training"]
    assert (settings["world_size"], settings["grad_accum"], settings["zero1"]) == (2, 2, True)
    # every logged row too: the tokens counted, and the losses averaged across the ranks
    for a, b in zip(*[list(map(json.loads, open(run / "metrics.jsonl"))) for run in (on_two, one)], strict=True):
        assert (a["step"], a["tokens_seen"]) == (b["step"], b["tokens_seen"])
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        if a["step"] > 0:  # step 0 has no train loss yet
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_run_on_two_processes_resumes_on_one_and_on_four(tiny_dataset, on_two, tmp_path):
    """On 4 without ZeRO-1 (plain DDP: every rank holds AdamW's whole state), from ZeRO-1's checkpoint: that
    layout must end where one process accumulating the same micro-batches ends too."""
    for processes in (1, 4):
        run = tmp_path / f"on{processes}"
        shutil.copytree(on_two, run, symlinks=True)
        resume = ["--resume", os.path.join(run, ckpt.CHECKPOINTS, ckpt.STEP_DIR.format(STEPS // 2))]
        if processes == 1:
            train.main(args(tiny_dataset, run, *resume))
        else:
            out = torchrun(processes, args(tiny_dataset, run, "--no-zero1", *resume))
            assert "now 2 x 1 x 4" in out  # it says what it changed
        rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
        assert [r["step"] for r in rows] == [0, STEPS // 2, STEPS]
        assert_close(weights(run), weights(on_two))


def test_zero1_partitions_every_parameter_once_largest_first_onto_the_lightest_rank():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (60, 100, 10, 50, 40, 10)]
    # by hand: 100, 60, 50, 40, 10, 10 each onto the rank holding the fewest elements so far
    for world, want in ((1, [270]), (2, [140, 130]), (3, [100, 80, 90])):
        opt = optim.ZeroAdamW(params, rank=0, world=world, lr=1e-3)  # the partition needs no process group
        assert [sum(p.numel() for p in share) for share in opt.owned] == want
        assert sorted(id(p) for share in opt.owned for p in share) == sorted(id(p) for p in params)


@pytest.fixture
def one_process_group(tmp_path, monkeypatch):
    """A gloo group of one process, its collectives checked by tests/nccl_rules.py."""
    import nccl_rules
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    gather = dist.all_gather
    for name in nccl_rules.CHECKED:
        monkeypatch.setattr(dist, name, nccl_rules.checked(name, getattr(dist, name), gather))
    yield nccl_rules.NCCLRuleError
    dist.destroy_process_group()


def test_the_nccl_rules_refuse_what_nccl_refuses_and_pass_what_it_takes(one_process_group):
    rule_error = one_process_group
    tall = torch.randn(6, 4)
    with pytest.raises(rule_error, match="not contiguous"):
        dist.all_gather([torch.empty(4, 6)], tall.T)  # newton_schulz's transposed result, before the fix
    with pytest.raises(rule_error, match="not contiguous"):
        dist.broadcast(tall[:, :2], src=0)
    with pytest.raises(rule_error, match="several dtypes"):
        dist.all_gather([torch.empty(4, dtype=torch.bfloat16)], torch.zeros(4))
    with pytest.raises(rule_error, match="shapes"):
        dist.all_gather([torch.empty(3, 4)], torch.zeros(4, 3))
    gathered = [torch.empty(4, 6)]
    dist.all_gather(gathered, tall.T.contiguous())
    assert torch.equal(gathered[0], tall.T)  # the real collective still ran
    total = torch.ones(3)
    dist.all_reduce(total)
    assert total.tolist() == [1.0, 1.0, 1.0]


DISAGREEING = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(4)
dist.all_reduce(t) if dist.get_rank() == 0 else dist.broadcast(t, src=0)
"""


@pytest.mark.slow
def test_the_nccl_rules_stop_ranks_that_call_different_collectives(tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text(DISAGREEING)
    with pytest.raises(AssertionError) as failed:
        torchrun(2, [], script=str(script))
    assert "the ranks disagree on a collective" in str(failed.value)
    assert "rank 0: all_reduce" in str(failed.value) and "rank 1: broadcast" in str(failed.value)
