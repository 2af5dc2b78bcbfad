"""Benchmark: the shipped SITReg brain model beside ANTs SyN on held-out brain pairs, in one table.

    pip install -e ".[bench]"            # antspyx
    python scripts/benchmark_brain.py --label_maps /path/to/synthseg_label_maps [--threads 2] [--subset all]

Pairs (never seen in training): ``training_seg_09`` <-> ``training_seg_10`` in both directions, and each of
09 / 10 (moving) against every training map (fixed), each in two contrasts: T1-like and random
(:func:`monai_ext.data.synthbrain.render_pair`: skull-stripped images synthesised from the real label maps,
each on a 2 mm 88x104x88 RAS grid centred on its brain). ``--subset quick`` keeps 09 <-> 10 and two training
maps, ``--subset held_out`` 09 <-> 10 only (for the slow ANTs setting).

Methods, all on the same 2 mm images (ANTs gets both images in one physical space, so both methods start
from the same centroid alignment):

* ``ours``: ``bundles/sitreg_brain`` network and weights (``models/model.pt``), one forward + inverse pass;
* ``ours_fields``: what the bundle runs by default: the same pass, then
  :func:`monai_ext.engines.field_refinement.refine_fields` (the bundle's ``field_refinement_steps`` /
  ``field_refinement_lr``); ``--field_steps`` adds a table of Dice and seconds against the number of steps (each
  count run from the network's fields; its largest count is the row when it differs from the bundle's);
* ``ants_default``: ``ants.registration(type_of_transform="SyN")`` with antspyx defaults (affine + SyN, MI);
* ``ants_strong``: ``type_of_transform="SyN"``, ``syn_metric="CC"``, ``syn_sampling=4`` (CC radius 4),
  ``reg_iterations=(100, 70, 50, 20)``;
* ``ours_refined``: test-time refinement of the weights, the bundle's instance optimisation started from the
  shipped weights
  (:class:`monai_ext.engines.instance_optimization.InstanceOptimization`: Adam on a copy of the network with the
  bundle's unsupervised loss, local NCC + regulariser; ``--refine_steps``, ``--refine_lr``): its row is the
  result after the last step (seconds include the optimisation), and a second table gives Dice and seconds
  after each of ``--refine_steps``;
* ``identity``: no registration.

Columns (means over pairs): Dice over the 31 standard FreeSurfer brain structures of both hemispheres
(:data:`monai_ext.data.synthbrain.BRAIN_LABELS`), HD95 in mm (MONAI, mean over structures), % of voxels
with a non-positive Jacobian determinant, SDlogJ, inverse consistency (mean absolute component of
phi_f o phi_i - id in voxels, on the forward and inverse fields each method returns), seconds per pair (the registration alone), and the
peak resident memory of the process running the method (each method runs in its own subprocess).
Each method's per-pair rows are cached in ``--cache`` (JSON, keyed by method and pair) when given, so a
rerun only computes what is missing; ``--refresh METHOD`` recomputes one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("identity", "ours", "ours_fields", "ours_refined", "ants_default", "ants_strong")
SHAPE, SPACING = (88, 104, 88), 2.0
# the options whose change invalidates a method's cached rows
PROTOCOL = {"ours_fields": ("field_steps", "field_lr"), "ours_refined": ("steps", "lr")}


def _pairs(label_maps: str, subset: str) -> list[tuple[str, str, str]]:
    from monai_ext.data.synthbrain import label_map_files

    train = [Path(p).name.split(".")[0] for p in label_map_files(label_maps, "train")]
    held = [Path(p).name.split(".")[0] for p in label_map_files(label_maps, "validate")]
    fixed_maps = {"all": train, "quick": train[:2], "held_out": []}[subset]
    names = [(held[0], held[1]), (held[1], held[0])] + [(h, t) for h in held for t in fixed_maps]
    return [(m, f, c) for c in ("t1", "random") for m, f in names]


def _render(label_maps: str, moving: str, fixed: str, contrast: str) -> dict:
    import torch

    from monai_ext.data.synthbrain import load_brain_label_map, render_pair

    maps = {name: load_brain_label_map(Path(label_maps) / f"{name}.nii.gz") for name in (moving, fixed)}
    seed = sum(ord(c) for c in moving + fixed + contrast)
    return render_pair(maps[moving], maps[fixed], SHAPE, SPACING, contrast == "t1", torch.Generator().manual_seed(seed))


def _metrics(pair: dict, forward_ddf, inverse_ddf, seconds: float) -> dict:
    """Scores of voxel DDFs ``(1, 3, *SHAPE)`` on the fixed / moving model grids."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    from monai_ext.data.synthbrain import BRAIN_LABELS
    from monai_ext.metrics.overlap import label_overlap
    from monai_ext.metrics.deformation import folding_fraction, inverse_consistency_error, sdlogj
    from monai_ext.spatial.sampling import warp

    labels = list(range(1, len(BRAIN_LABELS) + 1))
    warped = warp(pair["moving_label"][None], forward_ddf, mode="nearest", padding="zeros")
    fixed = pair["fixed_label"][None]
    row = {"dice": label_overlap(warped, fixed, labels)["dice"]}
    values = torch.tensor(labels).view(1, -1, 1, 1, 1)
    pred, ref = (warped == values).float(), (fixed == values).float()
    both = (pred.flatten(2).any(-1) & ref.flatten(2).any(-1))[0]
    hd95 = compute_hausdorff_distance(pred[:, both], ref[:, both], include_background=True, percentile=95)
    row["hd95_mm"] = float(hd95.nanmean()) * SPACING
    ddf = forward_ddf.double()
    row["folding_percent"] = 100 * float(folding_fraction(ddf)[0])
    row["sdlogj"] = float(sdlogj(ddf)[0])
    row["ic_voxels"] = float(inverse_consistency_error(ddf, inverse_ddf.double())["mae"][0])
    row["seconds"] = seconds
    return row


def _run_ours(pair: dict, network) -> dict:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        forward_ddf, inverse_ddf = network.forward_and_inverse(pair["moving_image"][None], pair["fixed_image"][None])
    return _metrics(pair, forward_ddf, inverse_ddf, time.perf_counter() - start)


def _run_fields(pair: dict, network, steps: list[int], learning_rate: float) -> dict:
    """The network's pass, then field refinement with each of ``steps`` (from the network's fields); the scores of the
    largest count, and ``"curve"``: ``{count: [dice, seconds]}`` (0: the network alone), scoring excluded."""
    import torch

    from monai_ext.engines.field_refinement import refine_fields

    moving, fixed = pair["moving_image"][None], pair["fixed_image"][None]
    start = time.perf_counter()
    with torch.no_grad():
        forward_ddf, inverse_ddf = network.forward_and_inverse(moving, fixed)
    network_seconds = time.perf_counter() - start
    curve = {0: [_metrics(pair, forward_ddf, inverse_ddf, network_seconds)["dice"], network_seconds]}
    for count in steps:
        start = time.perf_counter()
        fields = refine_fields(moving, fixed, forward_ddf, inverse_ddf, steps=count, learning_rate=learning_rate)
        row = _metrics(pair, *fields, network_seconds + time.perf_counter() - start)
        curve[count] = [row["dice"], row["seconds"]]
    return {**row, "curve": curve}


def _run_refined(pair: dict, network, loss, steps: list[int], learning_rate: float) -> dict:
    """Instance optimisation from ``network`` for ``max(steps)`` steps; the scores after the last step, and
    ``"curve"``: ``{step: [dice, seconds]}`` after each of ``steps`` (0: the shipped network), scoring excluded."""
    import torch

    from monai_ext.engines.instance_optimization import InstanceOptimization, SymmetricPairLoss

    moving, fixed = pair["moving_image"][None], pair["fixed_image"][None]
    curve, clock = {}, {"optimising": 0.0, "since": time.perf_counter()}

    def score(step: int, tuned) -> None:
        clock["optimising"] += time.perf_counter() - clock["since"]
        if step == 0 or step in steps:
            with torch.no_grad():
                start = time.perf_counter()
                forward_ddf, inverse_ddf = tuned.forward_and_inverse(moving, fixed)
                inference = time.perf_counter() - start
            row = _metrics(pair, forward_ddf, inverse_ddf, clock["optimising"] + inference)
            curve[step] = [row["dice"], row["seconds"]]
            if step == max(steps):
                curve["last"] = row
        clock["since"] = time.perf_counter()

    optimisation = InstanceOptimization(lambda *_: None, SymmetricPairLoss(loss), max(steps), learning_rate)
    score(0, network)
    optimisation.optimize(network, moving, fixed, callback=score)
    return {**curve.pop("last"), "curve": curve}


def _ants_field(path: str):
    """An ANTs displacement field (physical mm along the axes of our identity-direction images) -> voxel DDF."""
    import ants
    import torch

    field = ants.image_read(path).numpy()  # (X, Y, Z, 3)
    return torch.from_numpy(field).movedim(-1, 0)[None].float() / SPACING


def _run_ants(pair: dict, strong: bool) -> dict:
    import ants

    def image(tensor):
        return ants.from_numpy(tensor[0].numpy().astype("float32"), spacing=(SPACING,) * 3)

    fixed, moving = image(pair["fixed_image"]), image(pair["moving_image"])
    options = {"syn_metric": "CC", "syn_sampling": 4, "reg_iterations": (100, 70, 50, 20)} if strong else {}
    start = time.perf_counter()
    result = ants.registration(fixed, moving, type_of_transform="SyN", **options)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        forward = ants.apply_transforms(fixed, moving, result["fwdtransforms"], compose=os.path.join(tmp, "fwd_"))
        inverse = ants.apply_transforms(
            moving, fixed, result["invtransforms"], whichtoinvert=[True, False], compose=os.path.join(tmp, "inv_")
        )
        forward_ddf, inverse_ddf = _ants_field(forward), _ants_field(inverse)
    return _metrics(pair, forward_ddf, inverse_ddf, seconds)


def _child(method: str, label_maps: str, pairs: list[list[str]], threads: int, refine: dict) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    network = loss = None
    if method in ("ours", "ours_fields", "ours_refined"):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / "sitreg_brain" / "configs" / "inference.json"))
        network = parser.get_parsed_content("network_def").eval()
        network.load_state_dict(torch.load(REPO / "bundles" / "sitreg_brain" / "models" / "model.pt", weights_only=True))
        loss = parser.get_parsed_content("loss")
    rows = {}
    for moving, fixed, contrast in pairs:
        pair = _render(label_maps, moving, fixed, contrast)
        if method == "identity":
            zero = torch.zeros(1, 3, *SHAPE)
            row = _metrics(pair, zero, zero, 0.0)
        elif method == "ours":
            row = _run_ours(pair, network)
        elif method == "ours_fields":
            row = _run_fields(pair, network, refine["field_steps"], refine["field_lr"])
        elif method == "ours_refined":
            row = _run_refined(pair, network, loss, refine["steps"], refine["lr"])
        else:
            row = _run_ants(pair, strong=method == "ants_strong")
        rows["|".join((moving, fixed, contrast))] = row
        print(json.dumps({"progress": [moving, fixed, contrast, row["dice"]]}), file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"rows": rows, "peak_rss_gb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label_maps", required=True, help="folder of the SynthSeg training label maps (1 mm)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--subset", default="all", choices=("all", "quick", "held_out"),
        help="pairs: all (default), quick (09 <-> 10 and two training maps), held_out (09 <-> 10 only)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--cache", default=None, help="JSON file of per-pair rows reused across runs")
    parser.add_argument("--refresh", nargs="*", default=[], choices=METHODS, help="methods to recompute")
    parser.add_argument(
        "--refine_steps", nargs="+", type=int, default=[5, 10, 20],
        help="ours_refined: instance-optimisation steps at which Dice and seconds are reported (runs the largest)",
    )  # fmt: skip
    parser.add_argument(
        "--refine_lr", type=float, default=None,
        help="ours_refined: Adam learning rate (default: the bundle's instance_optimization_lr)",
    )  # fmt: skip
    parser.add_argument(
        "--field_steps", nargs="+", type=int, default=None,
        help="ours_fields: refinement step counts for the Dice / seconds table (default: the bundle's "
        "field_refinement_steps only)",
    )  # fmt: skip
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_pairs", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.refine_steps) < 1 or min(args.field_steps or [1]) < 1:
        parser.error(f"--refine_steps and --field_steps must be positive, got {args.refine_steps}, {args.field_steps}")
    config = json.loads((REPO / "bundles" / "sitreg_brain" / "configs" / "inference.json").read_text())
    if args.refine_lr is None:
        args.refine_lr = float(config["instance_optimization_lr"])
    refine = {
        "steps": sorted(set(args.refine_steps)),
        "lr": args.refine_lr,
        "field_steps": sorted(set(args.field_steps or [int(config["field_refinement_steps"])])),
        "field_lr": float(config["field_refinement_lr"]),
    }
    if args._child:
        _child(args._child, args.label_maps, json.loads(args._pairs), args.threads, refine)
        return
    pairs = _pairs(args.label_maps, args.subset)
    cache = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).is_file() else {}
    results = {}
    for method in args.methods:
        stored = {"rows": {}} if method in args.refresh else cache.get(method, {"rows": {}})
        protocol = {key: refine[key] for key in PROTOCOL.get(method, ())}
        if protocol and stored.get("protocol") != protocol:
            stored = {"rows": {}}  # other steps or learning rate: recompute
        missing = [p for p in pairs if "|".join(p) not in stored["rows"]]
        if missing:
            command = [sys.executable, __file__, "--_child", method, "--label_maps", args.label_maps]
            command += ["--threads", str(args.threads), "--_pairs", json.dumps(missing)]
            command += ["--refine_steps", *map(str, refine["steps"]), "--refine_lr", str(refine["lr"])]
            command += ["--field_steps", *map(str, refine["field_steps"])]
            output = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
            fresh = json.loads(output.strip().splitlines()[-1])
            stored = {"rows": {**stored.get("rows", {}), **fresh["rows"]}, "peak_rss_gb": fresh["peak_rss_gb"]}
            if protocol:
                stored["protocol"] = protocol
        cache[method] = stored
        results[method] = stored
        if args.cache:
            Path(args.cache).write_text(json.dumps(cache, indent=1))
    columns = ("dice", "hd95_mm", "folding_percent", "sdlogj", "ic_voxels", "seconds")
    print(f"{len(pairs) // 2} pairs x 2 contrasts at 2 mm, {args.threads} threads")
    print(f"| method | contrast | {' | '.join(columns)} | peak RSS GB |")
    print("|---" * (len(columns) + 3) + "|")
    for method in args.methods:
        for contrast in ("t1", "random"):
            rows = [results[method]["rows"]["|".join(p)] for p in pairs if p[2] == contrast]
            means = [sum(r.get(c, float("nan")) for r in rows) / len(rows) for c in columns]
            cells = " | ".join(f"{v:.3f}" if c != "seconds" else f"{v:.2f}" for c, v in zip(columns, means))
            print(f"| {method} | {contrast} | {cells} | {results[method].get('peak_rss_gb', float('nan')):.2f} |")
    titles = {
        "ours_fields": f"Field refinement after the network's pass (Adam, lr {refine['field_lr']:g})",
        "ours_refined": f"Weight refinement from the shipped weights (Adam, lr {refine['lr']:g})",
    }
    for method, title in titles.items():
        if method not in results:
            continue
        print(f"\n{title}: mean Dice / seconds per pair")
        steps = [0, *refine["field_steps" if method == "ours_fields" else "steps"]]
        print("| contrast | " + " | ".join(f"{n} steps" for n in steps) + " |")
        print("|---" * (len(steps) + 1) + "|")
        for contrast in ("t1", "random"):
            rows = [results[method]["rows"]["|".join(p)] for p in pairs if p[2] == contrast]
            cells = []
            for n in steps:
                points = [row["curve"][str(n)] for row in rows]  # JSON keys
                dice, seconds = (sum(v) / len(points) for v in zip(*points))
                cells.append(f"{dice:.3f} / {seconds:.1f} s")
            print(f"| {contrast} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
