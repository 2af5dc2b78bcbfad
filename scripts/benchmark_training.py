"""Benchmark: seconds per training step and peak memory, the brain bundle's configuration beside OASIS's.

    python scripts/benchmark_training.py [--threads 2] [--steps 3] [--label_maps DIR]

Rows (each in a fresh subprocess, so that the peak resident memory belongs to that configuration alone):

* ``sitreg_brain``: ``bundles/sitreg_brain/configs/train.json`` as it trains: 88x104x88 at 2 mm, deformations
  on the 4 mm transformation grid, one symmetric label-driven step (soft Dice of the warped one-hot label maps
  on that grid + gradient regulariser, :class:`monai_ext.engines.registration.LabelRegistrationTrainIteration`)
  on a pair synthesised from real label maps (the shipped 2 mm demo maps unless ``--label_maps`` names a
  folder), including the synthesis of the pair;
* ``sitreg_oasis``: ``bundles/sitreg_oasis/configs/train.json``'s network and loss (local NCC + gradient, all
  deformations on the input grid) on a 96x112x96 pair, the size at which the brain-model issue measured it.

One warm-up step, then the mean of ``--steps`` timed steps. Target for the brain configuration: <= 2 s per
step and <= 2 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _measure(name: str, steps: int, threads: int, label_maps: str | None) -> dict[str, float]:
    import torch
    from monai.bundle import ConfigParser

    from monai_ext.demo import DEMO_DATA

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "train.json"))
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network_def")
    loss = parser.get_parsed_content("loss")
    optimizer = torch.optim.Adam(network.parameters(), 1e-4)
    if name == "sitreg_brain":
        from monai_ext.data.synthbrain import SynthBrainPairDataset
        from monai_ext.engines.registration import LabelRegistrationTrainIteration

        folder = Path(label_maps) if label_maps else DEMO_DATA
        files = sorted(str(p) for p in folder.glob("*.nii*"))
        dataset = SynthBrainPairDataset(files, parser["shape"], parser["spacing"], pairs_per_epoch=steps + 1)
        iteration = LabelRegistrationTrainIteration(parser["num_classes"], parser["saturation_weight"])

        def batch(i: int) -> dict:
            return {k: v[None] for k, v in dataset[i].items()}

    else:
        from monai_ext.engines.registration import RegistrationTrainIteration

        iteration = RegistrationTrainIteration()
        images = [torch.rand(1, 1, 96, 112, 96) for _ in range(2)]

        def batch(i: int) -> dict:
            return {"moving_image": images[0], "fixed_image": images[1]}

    class _Engine:  # the attributes an iteration reads from MONAI's SupervisedTrainer
        pass

    engine = _Engine()
    engine.network, engine.optimizer, engine.loss_function = network, optimizer, loss
    engine.optim_set_to_none, engine.non_blocking, engine.fire_event = True, False, lambda event: None
    engine.state = _Engine()
    engine.state.device = torch.device("cpu")
    iteration(engine, batch(0))  # warm-up: thread pools, oneDNN kernels
    start = time.perf_counter()
    for i in range(steps):
        iteration(engine, batch(i + 1))
    seconds = (time.perf_counter() - start) / steps
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB
    parameters = sum(p.numel() for p in network.parameters())
    return {"seconds_per_step": seconds, "peak_rss_gb": peak_gb, "parameters": parameters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--label_maps", default=None, help="folder of FreeSurfer label maps (default: the demo maps)")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(_measure(args._child, args.steps, args.threads, args.label_maps)))
        return
    rows = []
    for name, grid in (("sitreg_brain", "88x104x88, 4 mm transformation grid"), ("sitreg_oasis", "96x112x96")):
        command = [sys.executable, __file__, "--_child", name, "--threads", str(args.threads), "--steps", str(args.steps)]
        if args.label_maps:
            command += ["--label_maps", args.label_maps]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append((name, grid, json.loads(result.stdout.strip().splitlines()[-1])))
    print(f"{'configuration':<14} {'grid':<36} {'params':>9} {'s/step':>8} {'peak RSS GB':>12}")
    for name, grid, row in rows:
        print(f"{name:<14} {grid:<36} {row['parameters']:>9,} {row['seconds_per_step']:>8.2f} {row['peak_rss_gb']:>12.2f}")
    print("target (sitreg_brain): <= 2 s per step, <= 2 GB")


if __name__ == "__main__":
    main()
