"""Data-parallel EP / BPTT training with torch.distributed (launched by torchrun).

    torchrun --nproc_per_node=4 main.py --dataset IMDB ... --save

`--batch_size` stays the global batch. Every rank draws the same seeded permutation of the
epoch; each global batch is split evenly over the ranks (`shard`); each rank runs the free
and nudged phases on its part; the per-rank estimates, weighted by the part's size, are
summed across ranks (`average_grads`) so that every rank takes the same optimizer step on
the gradient of the whole batch. A run's result therefore does not depend on the number of
processes, up to floating-point summation order.

Backends: NCCL on CUDA (each rank uses cuda:LOCAL_RANK), gloo on CPU. Only rank 0 writes
files and logs. Outside torchrun (`WORLD_SIZE` unset or 1) nothing here is used.
"""
import datetime
import os

import torch
import torch.distributed as dist


def launched():
    """True when started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Dist:
    """This process's place in the process group, and the collectives training needs."""

    def __init__(self, timeout_s=1800):
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device(f"cuda:{self.local_rank}")
            torch.cuda.set_device(self.device)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=self.device if backend == "nccl" else None)
        self.backend = backend

    @property
    def main(self):
        return self.rank == 0

    def shard(self, idx):
        """This rank's contiguous part of a global index batch (sizes differ by at most one)."""
        return idx.tensor_split(self.world)[self.rank]

    def average_grads(self, model, n_local, n_global):
        """.grad ← Σ_ranks (n_r / N) · .grad_r: the estimate on the whole global batch.
        A rank with an empty part contributes zeros."""
        works = []
        for p in model.parameters():
            if p.grad is None or n_local == 0:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.mul_(n_local / n_global)
            works.append(dist.all_reduce(p.grad, async_op=True))
        for w in works:
            w.wait()

    def sum(self, values, device=None):
        """Element-wise sum of a list of numbers over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=device or self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_tensor(self, t):
        """A tensor summed element-wise over ranks (a new tensor, on the collective's device)."""
        out = t.to(self.device).clone()
        dist.all_reduce(out)
        return out.to(t.device)

    def broadcast_model(self, model):
        """Make every rank's weights rank 0's (bit for bit)."""
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()
