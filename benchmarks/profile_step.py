r"""Where one eager training step of the benchmark's flows goes: wall time, kernel time, launches.

For each library (krflows, zuko, and the conditioner-MLP floor of ``bench_training.py``) at each
batch size: the mean wall time of 20 steps (after 5 warm-up steps, no profiler), then
:mod:`torch.profiler` over 5 more steps for the device-kernel time and the number of kernel
launches per step. On a GPU, wall time far above kernel time means the step is bound by the
host (Python and dispatch per launch), and fewer launches (CUDA graphs, compilation) are the
lever. The numbers of benchmarks/RESULTS_gpu.md's eager table came from this script.

    python benchmarks/profile_step.py --device cuda 4096 65536
    python benchmarks/profile_step.py --device cuda --table 4096     # and krflows' top kernels
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_training as bt  # noqa: E402 - the benchmark's flows, target and step

import krflows  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("batches", type=int, nargs="+", metavar="B")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--table", action="store_true", help="print krflows' 15 costliest operations")
    args = p.parse_args()
    cuda = args.device == "cuda"
    s = bt.Settings(device=args.device)
    target = krflows.targets.Funnel(s.dim).to(device=args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    print("| B | library | wall ms/step | kernel ms/step | kernels/step |\n|---|---|---|---|---|")
    for batch in args.batches:
        for name in ("krflows", "zuko", bt.FLOOR):
            trainer = bt.FloorTrainer(s, batch) if name == bt.FLOOR else bt._trainer(name, s, target, batch)
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
            if args.table and name == "krflows":
                key = "self_device_time_total" if cuda else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60),
                      file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
