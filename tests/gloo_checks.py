"""Two gloo processes for the tests that check "2 ranks equal 1 process on the global batch".

    out = run_on_two_ranks(worker, *args)   # worker(rank, world, *args) runs in each process group member;
                                            # what rank 0 returns comes back here
Each worker computes on its half of the batch, reduces what it must (`dist.all_reduce`), and returns
tensors; the test compares them with one process on the whole batch.
"""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _entry(rank, worker, init_file, out_file, args):
    from fastmoco.distributed import end_process

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        result = worker(rank, WORLD, *args)
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()
    end_process(0)   # a failure above still reaches mp.spawn as a traceback; a success skips finalization's
                     # abort (a gloo thread releasing tensors while Python finalizes: fastmoco.distributed)


def run_on_two_ranks(worker, *args):
    with tempfile.TemporaryDirectory() as d:
        out_file = os.path.join(d, "out.pt")
        mp.spawn(_entry, args=(worker, os.path.join(d, "init"), out_file, args), nprocs=WORLD)
        return torch.load(out_file)


def moco_loss_and_grads(model, x1, x2, rank: int = 0, world: int = 1) -> torch.Tensor:
    """[loss, every gradient] of a MoCo model's step on shard `rank` of the batch (world 1: all of it)."""
    n = x1.shape[0] // world
    part = slice(rank * n, (rank + 1) * n)
    loss = model(x1[part], x2[part], torch.tensor(0.99))
    loss.backward()
    return torch.cat([loss.detach()[None]] + [p.grad.flatten() for p in model.parameters() if p.grad is not None])
