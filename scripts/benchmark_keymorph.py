"""Benchmark: one BrainMorph-size KeyMorph registration of a 256^3 pair on the CPU, and the dense TPS alone.

Prints a table per configuration: wall-clock seconds of the first call (including one-time costs such as oneDNN
kernel generation) and of a second, steady-state call, the CPU seconds of that call (all threads; on a shared
machine wall time above CPU time / threads means waiting for a core), and the peak resident memory (RSS) of the
process. Each configuration runs in a fresh subprocess so that its peak RSS is its own. Random weights (the speed
and memory do not depend on them) and smooth random images.

* ``register_affine`` / ``register_tps``: ``KeyMorph.register`` of the ``keymorph_foundation`` bundle's network
  (truncated U-Net, f_maps 32, 4 levels = size S, 256 keypoints, power weights) with alignment ``affine`` /
  ``tps_1``, including both keypoint detections and the dense voxel DDF, without gradients (the backbone's
  memory-saving path);
* ``tps_dense``: fitting a TPS to 256 random keypoint pairs and evaluating the DDF on a 256^3 grid
  (``KeypointTransform.ddf``); target: peak RSS under 4 GB with the bundles' ``chunk_size``.

    python scripts/benchmark_keymorph.py [--threads 2] [--size 256] [--chunk-size 65536] [--levels 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = ("register_affine", "register_tps", "tps_dense")


def _measure(config: str, size: int, threads: int, chunk_size: int, levels: int, keypoints: int) -> dict[str, float]:
    import torch

    from monai_ext.networks.keymorph import KeyMorph, fit_keypoint_transform
    from monai_ext.networks.keypoints import TruncatedUNetKeypointNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = (size,) * 3
    if config == "tps_dense":
        fixed = torch.rand(1, keypoints, 3) * 2 - 1
        moving = fixed + 0.05 * torch.randn(1, keypoints, 3)
        run = lambda: fit_keypoint_transform(fixed, moving, "tps_1").ddf(shape, chunk_size=chunk_size)
    else:
        backbone = TruncatedUNetKeypointNet(num_keypoints=keypoints, num_levels=levels)
        model = KeyMorph(backbone, weighted=True, chunk_size=chunk_size).eval()
        smooth = torch.nn.functional.avg_pool3d(torch.rand(2, 1, *shape), 9, 1, 4)
        alignment = "affine" if config == "register_affine" else "tps_1"
        run = lambda: model.register(smooth[:1], smooth[1:], alignment)
    times = []
    with torch.no_grad():
        for _ in range(2):
            start, cpu = time.perf_counter(), time.process_time()
            run()
            times.append((time.perf_counter() - start, time.process_time() - cpu))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB
    return {"first_s": times[0][0], "steady_s": times[1][0], "steady_cpu_s": times[1][1], "peak_rss_gb": peak_gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=65536, help="TPS voxels per chunk (bundle default)")
    parser.add_argument("--levels", type=int, default=4, help="truncated U-Net levels (4 = BrainMorph S)")
    parser.add_argument("--keypoints", type=int, default=256)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = (args.size, args.threads, args.chunk_size, args.levels, args.keypoints)
    if args.child:
        print(json.dumps(_measure(args.child, *options)))
        return
    rows = []
    for config in args.configs:
        cmd = [sys.executable, __file__, "--child", config, "--size", str(args.size), "--threads", str(args.threads),
               "--chunk-size", str(args.chunk_size), "--levels", str(args.levels), "--keypoints", str(args.keypoints)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"benchmark '{config}' failed:\n{result.stderr}")
        rows.append((config, json.loads(result.stdout.strip().splitlines()[-1])))
    print(
        f"KeyMorph, {args.size}^3, truncated U-Net {args.levels} levels, {args.keypoints} keypoints, CPU, "
        f"{args.threads} threads, TPS chunk {args.chunk_size}"
    )
    print(f"{'configuration':<16} {'first (s)':>10} {'steady (s)':>11} {'steady CPU (s)':>15} {'peak RSS (GB)':>14}")
    for config, r in rows:
        print(
            f"{config:<16} {r['first_s']:>10.2f} {r['steady_s']:>11.2f} {r['steady_cpu_s']:>15.2f} "
            f"{r['peak_rss_gb']:>14.2f}"
        )


if __name__ == "__main__":
    main()
