"""Two gloo ranks; each leaves a collective in flight on a tensor torch keeps a PyObject for.

    python -m torch.distributed.run --nproc_per_node 2 tests/exit_race_worker.py plain|end_process

Rank 1 joins the all_reduce 1.5 s late; both ranks then stay in interpreter finalization for 3 s (a
module global's slow __del__), so the gloo worker thread lets go of the tensor while Python
finalizes. `plain` leaves through normal exit (the abort fastmoco's entries once died of after a
complete run); `end_process` through fastmoco.distributed.end_process, which must exit 0."""
import sys
import time

import torch
import torch.distributed as dist

from fastmoco.distributed import end_process


class SlowToFinalize:
    def __del__(self):
        time.sleep(3)


def leave_a_collective_in_flight(rank: int) -> None:
    t = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    t.note = "an attribute: torch keeps this tensor's PyObject while C++ holds the tensor"
    if rank == 1:
        time.sleep(1.5)
    dist.all_reduce(t, async_op=True)   # the work, and with it the tensor, dropped by Python here


if __name__ == "__main__":
    dist.init_process_group("gloo")
    slow = SlowToFinalize()
    leave_a_collective_in_flight(dist.get_rank())
    print(f"rank {dist.get_rank()}: left", flush=True)
    if sys.argv[1] == "end_process":
        end_process(0)
