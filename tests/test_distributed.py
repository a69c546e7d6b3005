"""Two processes on CPU (gloo): DistributedDataParallel with local and with synchronised BN.

nn.SyncBatchNorm refuses CPU tensors, so the oracle is what it computes by definition:
one process running the whole (concatenated) batch. With sync_bn each rank's outputs,
input gradients, running statistics and, after DDP averaging, its parameters match
that big-batch run; without sync_bn each rank matches a run on its own half.
"""

import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_preact as fp
from fused_preact.testing import PreActBlock as EagerBlock
from fused_preact.testing import PreActBottleneck as EagerBottleneck
from fused_preact.testing import randomize_bn
import timm_like
from helpers import assert_close, node_names

WORLD = 2
STEPS = 3
LR = 0.1


def make_model(layout="kuangliu"):
    """kuangliu's blocks, or timm's (a pooled avg_down projection, then a bottleneck), whose
    BatchNormAct2ds timm's own convert_sync_batchnorm synchronises (SYNC_CONVERTERS)."""
    torch.manual_seed(0)
    if layout == "kuangliu":
        model = nn.Sequential(EagerBlock(3, 4, 2), EagerBottleneck(4, 2, 1)).double()
    else:
        model = nn.Sequential(timm_like.PreActBasic(3, 4, 2, avg_down=True), timm_like.PreActBottleneck(4, 8)).double()
    randomize_bn(model)
    return model


SYNC_CONVERTERS = {"kuangliu": nn.SyncBatchNorm.convert_sync_batchnorm, "timm": timm_like.convert_sync_batchnorm}


def batches():
    g = torch.Generator().manual_seed(1)
    # Ranks get different batch sizes (3 and 2 images): the merge must weight by count.
    return [[torch.randn(3 if r == 0 else 2, 3, 8, 8, generator=g, dtype=torch.float64) for r in range(WORLD)]
            for _ in range(STEPS)]


def loss_weights(out):
    return torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)


def worker(rank, init_file, sync_bn, result_file, layout):
    """sync_bn: True, False, or the usual DDP recipe, nn.SyncBatchNorm.convert_sync_batchnorm
    (timm's convert_sync_batchnorm for timm's blocks), run "after" fp.convert (it swaps the
    fused blocks' BatchNorms for SyncBatchNorms) or "before" it (convert builds the blocks on
    them); either way the blocks take the SyncBatchNorms over, fused. DDP refuses SyncBatchNorm
    modules on the CPU, so with them the gradients are averaged by hand."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model = make_model(layout)
    if sync_bn == "before":
        model = SYNC_CONVERTERS[layout](model)
    model = fp.convert(model, backend="reference", sync_bn=sync_bn is True)
    ddp = None
    if sync_bn == "after":
        model = SYNC_CONVERTERS[layout](model)
    if sync_bn not in ("before", "after"):
        ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    record = []
    for step_batches in batches():
        x = step_batches[rank].clone().requires_grad_(True)
        out = (ddp or model)(x)
        opt.zero_grad()
        (out * loss_weights(out)).sum().backward()
        if ddp is None:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= WORLD
        opt.step()
        record.append((out.detach(), x.grad))
    # Each fused block one autograd node: synchronised blocks record their calls anew on every
    # call (no plan), but in one node.
    block_nodes = node_names(out)["BlockFunctionBackward"]
    torch.save({"steps": record, "state": model.state_dict(), "block_nodes": block_nodes}, f"{result_file}.{rank}")
    # Both ranks done before either tears gloo down, and DDP (whose reducer holds the process
    # group and its work) gone first: destroy_process_group only drops c10d's own references,
    # and a group that outlives it is torn down at interpreter exit, where gloo can abort (seen
    # twice in CI: a SIGABRT of rank 0 after its results were written, no Python error).
    del ddp, opt, record, out
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def run_world(tmp_path, sync_bn, layout="kuangliu"):
    result_file = str(tmp_path / "result")
    mp.spawn(worker, args=(str(tmp_path / "init"), sync_bn, result_file, layout), nprocs=WORLD, join=True)
    return [torch.load(f"{result_file}.{r}") for r in range(WORLD)]


@pytest.mark.parametrize("sync_bn,layout", [(True, "kuangliu"), ("after", "kuangliu"), ("before", "kuangliu"),
                                            (True, "timm"), ("after", "timm"), ("before", "timm")])
def test_sync_bn_matches_single_process_big_batch(tmp_path, sync_bn, layout):
    results = run_world(tmp_path, sync_bn=sync_bn, layout=layout)
    model = fp.convert(make_model(layout), backend="reference")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step, step_batches in enumerate(batches()):
        x = torch.cat(step_batches).requires_grad_(True)
        out = model(x)
        opt.zero_grad()
        # Each rank's loss weights its own half; DDP averages gradients over the ranks.
        halves = out.split([b.shape[0] for b in step_batches])
        (sum((h * loss_weights(h)).sum() for h in halves) / WORLD).backward()
        opt.step()
        grads = x.grad.split([b.shape[0] for b in step_batches])
        for rank in range(WORLD):
            got_out, got_dx = results[rank]["steps"][step]
            assert_close(got_out, halves[rank].detach(), torch.float64, f"step {step} rank {rank} output")
            assert_close(got_dx, grads[rank] * WORLD, torch.float64, f"step {step} rank {rank} grad x")
    for rank in range(WORLD):
        assert results[rank]["block_nodes"] == len(model), results[rank]["block_nodes"]
        for name, value in model.state_dict().items():
            got = results[rank]["state"][name]
            if value.is_floating_point():
                assert_close(got, value, torch.float64, f"rank {rank} {name}")
            else:
                assert torch.equal(got, value), name


def test_ddp_without_sync_uses_local_statistics(tmp_path):
    results = run_world(tmp_path, sync_bn=False)
    first = batches()[0]
    for rank in range(WORLD):
        model = fp.convert(make_model(), backend="reference")
        out = model(first[rank])
        assert_close(results[rank]["steps"][0][0], out.detach(), torch.float64, f"rank {rank} local-BN output")
    for name in results[0]["state"]:  # DDP keeps parameters equal; running stats stay local
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(results[0]["state"][name], results[1]["state"][name]), name
    assert not torch.equal(results[0]["state"]["0.bn1.running_mean"], results[1]["state"]["0.bn1.running_mean"])


# ---------------------------------------------------------------- ranks that disagree, odd batches
def sync_block(channels, dtype=torch.float64):
    torch.manual_seed(0)
    block = fp.PreActBlock(channels, channels, backend="reference", sync_bn=True).to(dtype)
    randomize_bn(block)
    return block


def edge_worker(rank, init_file, result_file):
    """Each scenario on both ranks; records the error message or the results."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    g = torch.Generator().manual_seed(3)
    shared_x = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    scenarios = {
        "channels": lambda: sync_block(4 if rank == 0 else 8)(torch.randn(2, 4 if rank == 0 else 8, 6, 6,
                                                                          dtype=torch.float64)),
        "dtype": lambda: sync_block(4, torch.float64 if rank == 0 else torch.float32)(
            torch.randn(2, 4, 6, 6, dtype=torch.float64 if rank == 0 else torch.float32)),
        "mode": lambda: sync_block(4).train(rank == 0)(torch.randn(2, 4, 6, 6, dtype=torch.float64)),
        "empty": lambda: step(sync_block(4), shared_x if rank == 0 else shared_x[:0]),
        "one_pixel": lambda: step(sync_block(4), torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64) * (rank + 1)),
    }
    outcome = {}
    for name, run in scenarios.items():
        try:
            outcome[name] = ("ok", run())
        except ValueError as e:
            outcome[name] = ("error", str(e))
    torch.save(outcome, f"{result_file}.{rank}")
    dist.destroy_process_group()


def step(block, x):
    x = x.clone().requires_grad_(True)
    out = block(x)
    (out * loss_weights(out)).sum().backward()
    return out.detach(), x.grad, block.bn1.running_mean.clone(), block.bn2.running_var.clone()


def test_sync_bn_ranks_that_disagree_or_have_odd_batches(tmp_path):
    """Disagreeing ranks raise the same clear error on every rank (before: an abort inside
    gloo, or a hang); an empty local batch and one pixel per rank work as nn.SyncBatchNorm."""
    result_file = str(tmp_path / "edge")
    mp.spawn(edge_worker, args=(str(tmp_path / "init"), result_file), nprocs=WORLD, join=True)
    outcome = [torch.load(f"{result_file}.{r}") for r in range(WORLD)]
    for name, what in (("channels", "rank 1: 8 channels"), ("dtype", "rank 1: 4 channels, float32"),
                       ("mode", "rank 1: 4 channels, float64, eval mode")):
        for rank in range(WORLD):
            kind, message = outcome[rank][name]
            assert kind == "error" and "synchronised BatchNorm" in message and what in message, (name, rank, message)
    # The empty rank adds nothing: rank 0 matches a single process on its own batch.
    g = torch.Generator().manual_seed(3)
    shared_x = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    solo = fp.PreActBlock(4, 4, backend="reference").double()
    solo.load_state_dict(sync_block(4).state_dict())
    expected = step(solo, shared_x)
    assert outcome[0]["empty"][0] == "ok" and outcome[1]["empty"][0] == "ok", outcome[1]["empty"]
    for got, want, what in zip(outcome[0]["empty"][1], expected, ("output", "grad x", "running_mean", "running_var")):
        assert_close(got, want, torch.float64, f"empty other rank: {what}")
    assert outcome[1]["empty"][1][0].shape[0] == 0
    assert_close(outcome[1]["empty"][1][2], expected[2], torch.float64, "empty rank's running_mean")
    # One 1x1 image per rank: two values per channel over the world, as nn.SyncBatchNorm allows.
    assert all(outcome[r]["one_pixel"][0] == "ok" for r in range(WORLD)), [outcome[r]["one_pixel"] for r in range(WORLD)]
    pixel = torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64)  # rank r used (r + 1) * pixel
    solo = fp.PreActBlock(4, 4, backend="reference").double()
    solo.load_state_dict(sync_block(4).state_dict())
    both = solo(torch.cat([pixel, 2 * pixel])).detach()
    for rank in range(WORLD):
        assert_close(outcome[rank]["one_pixel"][1][0], both[rank:rank + 1], torch.float64, f"one pixel, rank {rank}")
        assert_close(outcome[rank]["one_pixel"][1][2], solo.bn1.running_mean, torch.float64, "one pixel running_mean")
