"""Plot a bundle's training curve from its MLflow run: training loss per step and validation Dice per epoch.

    python scripts/plot_training.py --tracking_uri sqlite:///path/eval/mlruns.db --experiment sitreg_brain \\
        --out bundles/sitreg_brain/docs/training_curve.png

Reads the metrics that ``monai_ext.tracking`` logs (``train_loss`` every iteration, ``val_mean_dice`` and
``val_dice_before`` every epoch) from every run of the experiment (a resumed training is a new run: the runs
are concatenated by step) and writes one PNG with the loss (raw and a moving average) and the validation Dice.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402


def _history(client: MlflowClient, runs, key: str) -> list[tuple[int, float]]:
    points = {}
    for run in runs:
        for metric in client.get_metric_history(run.info.run_id, key):
            points[metric.step] = metric.value
    return sorted(points.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking_uri", required=True)
    parser.add_argument("--experiment", default="sitreg_brain")
    parser.add_argument("--out", required=True)
    parser.add_argument("--window", type=int, default=100, help="moving-average window (steps)")
    args = parser.parse_args()
    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} at {args.tracking_uri}")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    loss = _history(client, runs, "train_loss")
    dice = _history(client, runs, "val_mean_dice")
    before = _history(client, runs, "val_dice_before")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps, values = zip(*loss)
    left.plot(steps, values, color="0.8", linewidth=0.5, label="per step")
    window = max(1, min(args.window, len(values)))
    smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
    left.plot(steps, smooth, color="C0", label=f"moving average ({window} steps)")
    left.set(xlabel="training step (pair)", ylabel="loss (soft Dice loss + regulariser)", title="training loss")
    left.legend()
    if dice:
        epochs, values = zip(*dice)
        right.plot(epochs, values, "o-", color="C1", label="after registration")
    if before:
        epochs, values = zip(*before)
        right.plot(epochs, values, "--", color="0.5", label="before (identity)")
    right.set(xlabel="epoch", ylabel="mean Dice, held-out pairs", title="validation (09 <-> 10, 2 contrasts)")
    right.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"{args.out}: {len(loss)} steps, {len(dice)} validation epochs, last Dice {dice[-1][1] if dice else float('nan'):.4f}")


if __name__ == "__main__":
    main()
