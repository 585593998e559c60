r"""Where one eager training step (or a sampling call) of the benchmark's flows goes: wall time,
kernel time, launches.

For each library (krflows, zuko, and the conditioner-MLP floor of ``bench_training.py``) at each
batch size: the mean wall time of 20 steps (after 5 warm-up steps, no profiler), then
:mod:`torch.profiler` over 5 more steps for the device-kernel time and the number of kernel
launches per step. On a GPU, wall time far above kernel time means the step is bound by the
host (Python and dispatch per launch), and fewer launches (CUDA graphs, compilation) are the
lever. The numbers of benchmarks/RESULTS_gpu.md's eager table came from this script.

    python benchmarks/profile_step.py --device cuda 4096 65536
    python benchmarks/profile_step.py --device cuda --table 4096     # and krflows' top kernels
    python benchmarks/profile_step.py --device cuda --sample krflows-compile,zuko-compile 65536

``--sample LIBS``: instead of training steps, sampling (x and log q, under ``no_grad``) of the
named libraries of ``bench_training.py`` (compiled ones with ``dynamic=True``, as ``gpu_check.sh``
does, compiled before timing). Calls run back to back, so host and device overlap: the wall time
is what a sampling loop sees. RESULTS_gpu.md's compiled sampling numbers came from it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_training as bt  # noqa: E402 - the benchmark's flows, target and step

import krflows  # noqa: E402


class _Sampler:
    """``step()`` draws ``batch`` samples with their log density, without gradients."""

    def __init__(self, model: bt.Model, batch: int):
        self.model, self.batch = model, batch

    @torch.no_grad()
    def step(self):
        bt.cudagraph_step(self.model)  # CUDA graphs (-cg): a new iteration
        self.model.rsample_and_log_prob(self.batch)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("batches", type=int, nargs="+", metavar="B")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--table", action="store_true", help="print krflows' 15 costliest operations")
    p.add_argument("--sample", metavar="LIBS", help="profile sampling of these comma-separated libraries")
    args = p.parse_args()
    cuda = args.device == "cuda"
    s = bt.Settings(device=args.device, dynamic=True if args.sample else None)
    target = krflows.targets.Funnel(s.dim).to(device=args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    unit = "call" if args.sample else "step"
    print(f"| B | library | wall ms/{unit} | kernel ms/{unit} | kernels/{unit} |\n|---|---|---|---|---|")
    names = args.sample.split(",") if args.sample else ["krflows", "zuko", bt.FLOOR]
    for batch in args.batches:
        for name in names:
            if args.sample:
                trainer = _Sampler(bt.build(name, s.dim, s, s.seed), batch)
            elif name == bt.FLOOR:
                trainer = bt.FloorTrainer(s, batch)
            else:
                trainer = bt._trainer(name, s, target, batch)
            for _ in range(5):
                trainer.step()
            bt.synchronize(s)
            start = time.perf_counter()
            for _ in range(20):
                trainer.step()
            bt.synchronize(s)
            wall = (time.perf_counter() - start) / 20 * 1e3
            with profile(activities=activities) as prof:
                for _ in range(5):
                    trainer.step()
                bt.synchronize(s)
            kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            kernel_ms = sum(e.self_device_time_total for e in kernels) / 5e3
            launches = sum(e.count for e in kernels) / 5
            print(f"| {batch} | {name} | {wall:.2f} | {kernel_ms:.2f} | {launches:.0f} |", flush=True)
            if args.table and name.startswith("krflows"):
                key = "self_device_time_total" if cuda else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60),
                      file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
