"""Two processes on CPU (gloo): DistributedDataParallel with local and with synchronised BN.

nn.SyncBatchNorm refuses CPU tensors, so the oracle is what it computes by definition:
one process running the whole (concatenated) batch. With sync_bn each rank's outputs,
input gradients, running statistics and, after DDP averaging, its parameters match
that big-batch run; without sync_bn each rank matches a run on its own half.
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_preact as fp
from fused_preact.testing import PreActBlock as EagerBlock
from fused_preact.testing import PreActBottleneck as EagerBottleneck
from fused_preact.testing import randomize_bn
from helpers import assert_close

WORLD = 2
STEPS = 3
LR = 0.1


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(EagerBlock(3, 4, 2), EagerBottleneck(4, 2, 1)).double()
    randomize_bn(model)
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    # Ranks get different batch sizes (3 and 2 images): the merge must weight by count.
    return [[torch.randn(3 if r == 0 else 2, 3, 8, 8, generator=g, dtype=torch.float64) for r in range(WORLD)]
            for _ in range(STEPS)]


def loss_weights(out):
    return torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)


def worker(rank, init_file, sync_bn, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model = fp.convert(make_model(), backend="reference", sync_bn=sync_bn)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    record = []
    for step_batches in batches():
        x = step_batches[rank].clone().requires_grad_(True)
        out = ddp(x)
        opt.zero_grad()
        (out * loss_weights(out)).sum().backward()
        opt.step()
        record.append((out.detach(), x.grad))
    torch.save({"steps": record, "state": model.state_dict()}, f"{result_file}.{rank}")
    dist.destroy_process_group()


def run_world(tmp_path, sync_bn):
    result_file = str(tmp_path / "result")
    mp.spawn(worker, args=(str(tmp_path / "init"), sync_bn, result_file), nprocs=WORLD, join=True)
    return [torch.load(f"{result_file}.{r}") for r in range(WORLD)]


def test_sync_bn_matches_single_process_big_batch(tmp_path):
    results = run_world(tmp_path, sync_bn=True)
    model = fp.convert(make_model(), backend="reference")
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
