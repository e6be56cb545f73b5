"""All-reduce bandwidth between the GPUs of one host, at the gradient sizes DDP sends.

Run under ``torchrun --nproc-per-node N``. Times ``all_reduce`` of fp32 buffers (median of 10
after 3 warm-up calls) and prints the bus bandwidth as nccl-tests defines it
(``bytes * 2 * (N - 1) / N / time``), so the numbers compare with theirs. The LoRA gradients of the
7B bench (r 64, every linear layer) are 640 MB in fp32; DDP sends them in 25 MB buckets.

    torchrun --nproc-per-node 2 bench/allreduce_bandwidth.py
"""

from __future__ import annotations

import os
import statistics

import torch
import torch.distributed as dist


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
    for mb in (25, 100, 640):
        buf = torch.ones(mb * 2**20 // 4, device="cuda")
        times = []
        for i in range(13):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_reduce(buf)
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end) / 1e3)
        t = statistics.median(times)
        if rank == 0:
            bus = mb * 2**20 * 2 * (world - 1) / world / t / 1e9
            print(f"all_reduce {mb:4d} MB fp32 on {world} GPUs: {t * 1e3:7.2f} ms, bus bandwidth {bus:6.1f} GB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
