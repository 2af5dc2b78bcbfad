"""Benchmark: one SITReg registration of a 160x144x192 pair with the OASIS ``cc_grad_1.0`` architecture.

Prints a table of wall-clock seconds and peak resident memory (RSS) per configuration. Each measurement
runs in a fresh subprocess so that peak RSS belongs to that configuration alone.

    python scripts/benchmark_sitreg.py                 # forward pass (inference), CPU
    python scripts/benchmark_sitreg.py --train         # also a training step (forward + backward)
    python scripts/benchmark_sitreg.py --threads 2 --shape 160 144 192

Target (the SITReg authors' reference implementation needs ~65 s and 3.3 GB for one forward pass on a
2-core CPU): at most 20 s and 1.6 GB for the forward pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _measure(shape: list[int], train: bool, threads: int, warmup: bool) -> dict[str, float]:
    import torch

    from monai_ext.networks.sitreg import SITReg

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = SITReg(spatial_dims=3)  # OASIS cc_grad_1.0 defaults: features (8,40,40,40), deformation (16,72,72,72)
    moving = torch.rand(1, 1, *shape)
    fixed = torch.rand(1, 1, *shape)
    if warmup:  # one-time initialisation (thread pools, oneDNN kernels) on a small crop, outside the timing
        with torch.no_grad():
            net(torch.cat([moving, fixed], 1)[..., : shape[0] // 4, : shape[1] // 4, : shape[2] // 4])
    start = time.perf_counter()
    if train:
        forward_ddf, inverse_ddf = net.forward_and_inverse(moving, fixed)
        (forward_ddf.square().mean() + inverse_ddf.square().mean()).backward()
    else:
        with torch.no_grad():
            net.forward_and_inverse(moving, fixed)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB
    return {"seconds": seconds, "peak_rss_gb": peak_gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 144, 192])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="also measure one forward+backward step")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.shape, args.child == "train", args.threads, warmup=True)))
        return
    modes = ["inference"] + (["train"] if args.train else [])
    rows = []
    for mode in modes:
        cmd = [sys.executable, __file__, "--child", mode, "--threads", str(args.threads), "--shape", *map(str, args.shape)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"benchmark '{mode}' failed:\n{result.stderr}")
        rows.append((mode, json.loads(result.stdout.strip().splitlines()[-1])))
    shape = "x".join(map(str, args.shape))
    print(f"SITReg OASIS cc_grad_1.0, input {shape}, CPU, {args.threads} threads")
    print(f"{'mode':<10} {'seconds':>10} {'peak RSS (GB)':>14}")
    for mode, r in rows:
        print(f"{mode:<10} {r['seconds']:>10.2f} {r['peak_rss_gb']:>14.2f}")


if __name__ == "__main__":
    main()
