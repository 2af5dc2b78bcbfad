"""Label overlap and per-pair registration metrics, and the ignite ``Metric`` that collects them over a run.

:func:`label_overlap` gives the Dice (from voxel counts) and optionally the 95th-percentile Hausdorff
distance (MONAI ``compute_hausdorff_distance``) of two integer label maps; :func:`pair_metrics` gives every
column of one registered pair (Dice before / after in both directions, HD95, and the deformation metrics of
:mod:`monai_ext.metrics.deformation`); :class:`RegistrationMetrics` is an ignite ``Metric`` for a MONAI
evaluator's ``key_val_metric`` that applies :func:`pair_metrics` to each pair of the evaluation output and
writes the per-pair and summary tables.

The ``Metric`` lives here rather than in :mod:`monai_ext.engines` because it only computes and records
metrics: it reads ``engine.state.output`` (the dict written by
:class:`monai_ext.engines.registration.RegistrationEvalIteration`, keys listed in :func:`pair_metrics`)
without importing anything from the engines, so the metrics layer stays below the engines that use it.

An evaluator config uses it as::

    "key_val_metric": {"val_mean_dice": {"_target_": "monai_ext.metrics.overlap.RegistrationMetrics",
                                         "output_dir": "@output_dir"}}
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.metrics import Metric
from monai.data import MetaTensor
from monai.metrics import compute_hausdorff_distance

from monai_ext.data.atomic import atomic_output
from monai_ext.metrics.deformation import (
    folding_fraction,
    inverse_consistency_error,
    non_diffeomorphic_volume,
    sdlogj,
)

__all__ = ["label_overlap", "pair_metrics", "RegistrationMetrics"]


def _nan_mean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan


# voxels counted at once by _label_counts (a few 32 MB temporaries)
_COUNT_BLOCK = 1 << 22


def _label_counts(warped: torch.Tensor, target: torch.Tensor, labels: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Voxel counts ``(K,)`` of each of ``labels`` in ``warped``, in ``target`` and in both at once (int64).

    One pass of ``bincount`` over blocks of voxels: MONAI's ``compute_dice`` needs one-hot maps, ``K`` floats per
    voxel for each map (4.5 GB for 34 labels of a 256^3 pair), where these counts need a few bytes per voxel.
    """
    order = torch.tensor(sorted(set(int(v) for v in labels)), dtype=torch.int64, device=target.device)
    k = order.numel()
    if k == 0:
        return tuple(torch.zeros(0, dtype=torch.int64) for _ in range(3))
    counts = torch.zeros(3, k + 1, dtype=torch.int64, device=target.device)

    def code(values: torch.Tensor) -> torch.Tensor:  # 1 + position in `order`, 0 for any other value
        values = values.round().long()
        position = torch.searchsorted(order, values).clamp_(max=k - 1)
        return torch.where(order[position] == values, position + 1, 0)

    pred, ref = warped.flatten(), target.flatten()
    for start in range(0, pred.numel(), _COUNT_BLOCK):
        p, r = code(pred[start : start + _COUNT_BLOCK]), code(ref[start : start + _COUNT_BLOCK])
        counts[0] += torch.bincount(p, minlength=k + 1)
        counts[1] += torch.bincount(r, minlength=k + 1)
        counts[2] += torch.bincount(torch.where(p == r, p, 0), minlength=k + 1)
    index = torch.searchsorted(order, torch.tensor([int(v) for v in labels], device=target.device)) + 1
    return tuple(c[index].cpu() for c in counts)


def label_overlap(
    warped: torch.Tensor, target: torch.Tensor, labels: Sequence[int], suffix: str = "", hd95: bool = False
) -> dict[str, float]:
    """Dice (and HD95) of two ``(1, 1, *spatial)`` integer label maps on the same grid.

    Returns ``dice<suffix>`` (mean over ``labels`` ignoring labels absent from both maps, which are NaN),
    with an empty ``suffix`` also ``dice_label_<label>`` per label, and with ``hd95`` ``hd95<suffix>``: MONAI's
    95th-percentile Hausdorff distance in **voxel units**, mean over the labels present in both maps.
    Dice ``2 |A & B| / (|A| + |B|)`` from voxel counts (:func:`_label_counts`; memory of a few bytes per voxel).
    """
    if warped.shape != target.shape:
        raise ValueError(f"label maps differ in shape: {tuple(warped.shape)} and {tuple(target.shape)}")
    in_pred, in_ref, both_counts = _label_counts(warped, target, labels)
    dice = 2 * both_counts.double() / (in_pred + in_ref).double()  # NaN where the label is absent from both
    row = {f"dice{suffix}": _nan_mean(dice)}
    if not suffix:
        row.update({f"dice_label_{label}": float(d) for label, d in zip(labels, dice)})
    if not hd95:
        return row
    distances = torch.full((len(labels),), math.nan, dtype=torch.float64)
    both = (in_pred > 0) & (in_ref > 0)
    if both.any():
        present = torch.tensor([int(v) for v, b in zip(labels, both) if b], device=target.device)
        present = present.view(1, -1, *([1] * (target.ndim - 2)))
        pred, ref = (warped.round().long() == present), (target.round().long() == present)
        distances[both] = (
            compute_hausdorff_distance(pred.float(), ref.float(), include_background=True, percentile=95)[0]
            .cpu()
            .double()
        )
    row[f"hd95{suffix}"] = _nan_mean(distances)
    return row


def pair_metrics(
    item: Mapping[str, Any], labels: Sequence[int] | None = None, hd95: bool = False, index: int = 0
) -> dict[str, Any]:
    """Metrics of one pair of an evaluation output (as
    :class:`monai_ext.engines.registration.RegistrationEvalIteration` writes it, decollated).

    ``item`` holds unbatched tensors: ``forward_ddf`` ``(n, *spatial)`` (required), optionally ``inverse_ddf``,
    ``moving_label`` / ``fixed_label`` ``(1, *spatial)`` with ``moving_label_warped`` / ``fixed_label_warped``,
    and ``moving_name`` / ``fixed_name`` (else the images' file names, else ``pair<index>``).

    Returns ``moving_name``, ``fixed_name``; with labels ``num_labels`` (how many label values the Dice
    columns average over), ``dice_before`` (moving vs fixed labels unregistered),
    ``dice``, ``dice_label_<l>``, ``dice_inverse`` (and ``hd95``, ``hd95_inverse``), see :func:`label_overlap`;
    ``folding_fraction``, ``sdlogj``, ``ndv`` (3-D, else NaN) of ``forward_ddf``, and with ``inverse_ddf``
    ``ic_mse`` / ``ic_max`` (voxels), see :mod:`monai_ext.metrics.deformation`. ``labels`` defaults to the
    non-zero values present in either map.
    """

    def batched(key: str) -> torch.Tensor | None:
        value = item.get(key)
        if not isinstance(value, torch.Tensor):
            return None
        return (value.as_tensor() if isinstance(value, MetaTensor) else value).unsqueeze(0)

    row: dict[str, Any] = {}
    for side in ("moving", "fixed"):
        name = item.get(f"{side}_name")
        if name is None and hasattr(item.get(f"{side}_image"), "meta"):
            name = item[f"{side}_image"].meta.get("filename_or_obj")
        row[f"{side}_name"] = str(name) if name is not None else f"pair{index}"
    forward_ddf, inverse_ddf = batched("forward_ddf"), batched("inverse_ddf")
    if forward_ddf is None:
        raise ValueError(f"engine output must contain 'forward_ddf', got keys {sorted(item)}")
    moving_label, fixed_label = batched("moving_label"), batched("fixed_label")
    if moving_label is not None and fixed_label is not None:
        if labels is None:
            present = torch.cat([moving_label.flatten(), fixed_label.flatten()]).round().long().unique()
            labels = [int(v) for v in present if v != 0]
        if labels:
            row["num_labels"] = len(labels)
            if moving_label.shape == fixed_label.shape:
                row["dice_before"] = label_overlap(moving_label, fixed_label, labels, "_before")["dice_before"]
            for suffix, warped, target in (
                ("", "moving_label_warped", fixed_label),
                ("_inverse", "fixed_label_warped", moving_label),
            ):
                if batched(warped) is None:
                    raise ValueError(f"engine output has label maps but no {warped!r} (use RegistrationEvalIteration)")
                row.update(label_overlap(batched(warped), target, labels, suffix, hd95))
    ddf = forward_ddf.double()
    row["folding_fraction"] = float(folding_fraction(ddf)[0])
    row["sdlogj"] = float(sdlogj(ddf)[0])
    row["ndv"] = float(non_diffeomorphic_volume(ddf)[0]) if ddf.shape[1] == 3 else math.nan
    if inverse_ddf is not None:
        consistency = inverse_consistency_error(ddf, inverse_ddf.double())
        row["ic_mse"], row["ic_max"] = float(consistency["mse"][0]), float(consistency["max"][0])
    return row


def _write_text(path: Path, write: Callable[[Any], None]) -> None:
    """Write a text file through ``write(stream)`` with :func:`monai_ext.data.atomic.atomic_output`."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as stream:
        write(stream)


class RegistrationMetrics(Metric):
    """Per-pair registration metrics, summarised per evaluation run; an ignite ``Metric`` for ``key_val_metric``.

    For every pair in ``engine.state.output`` (as produced by
    :class:`monai_ext.engines.registration.RegistrationEvalIteration`, decollated or not), the columns of
    :func:`pair_metrics`:

    * ``dice_before``: Dice of the unregistered ``moving_label`` vs ``fixed_label`` (mean over labels).
    * ``dice`` / ``dice_label_<label>``: Dice of ``moving_label_warped`` vs ``fixed_label`` per label (MONAI
      ``compute_dice`` on one-hot maps), NaN for a label absent from both; ``dice`` = mean over labels
      ignoring NaN. ``dice_inverse``: the same for ``fixed_label_warped`` vs ``moving_label``.
    * ``hd95`` / ``hd95_inverse`` (if ``hd95``): MONAI ``compute_hausdorff_distance(percentile=95)`` per label in
      **voxel units** (as SITReg), mean over the labels present in both maps. It needs one distance
      transform per label and direction (tens of seconds per OASIS pair on a CPU): SITReg reports it on
      the test set only, so switch it off for per-epoch validation.
    * ``folding_fraction``, ``sdlogj`` and (3-D) ``ndv`` of ``forward_ddf``; ``ic_mse`` and ``ic_max``
      (inverse consistency of ``forward_ddf`` o ``inverse_ddf``, voxels) when ``inverse_ddf`` is present;
      see :mod:`monai_ext.metrics.deformation`.

    ``compute()`` returns the mean ``dice`` over pairs (the key metric, e.g. ``"val_mean_dice"``); on
    completion the mean of every other summary column is also put in ``engine.state.metrics`` as
    ``<prefix><column>``, and, if ``output_dir`` is set, ``per_pair.csv``, ``summary.csv`` and
    ``summary.json`` (mean, std, count over pairs, NaN/inf ignored) are written there atomically
    (overwritten on every run). Single-process only (no gathering across ranks).

    Args:
        labels: label values to evaluate (background excluded); default: the non-zero values present in
            either map of each pair.
        hd95: compute the HD95 columns.
        output_dir: folder of the CSV/JSON files; ``None`` writes nothing.
        prefix: prefix of the extra ``engine.state.metrics`` keys.
        output_transform: applied to ``engine.state.output`` first.
    """

    def __init__(
        self,
        labels: Sequence[int] | None = None,
        hd95: bool = True,
        output_dir: str | os.PathLike | None = None,
        prefix: str = "val_",
        output_transform: Callable = lambda x: x,
    ) -> None:
        if labels is not None and (len(labels) == 0 or 0 in labels):
            raise ValueError(f"labels must be a non-empty sequence of non-background label values, got {labels}")
        self.labels = None if labels is None else [int(v) for v in labels]
        self.hd95 = hd95
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.prefix = prefix
        self.rows: list[dict[str, Any]] = []
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self.rows = []

    def iteration_completed(self, engine: Any) -> None:
        self.update(self._output_transform(engine.state.output))

    def update(self, output: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Add the pairs of one iteration: a list of per-pair dicts (decollated) or one batched dict."""
        if isinstance(output, Mapping):
            size = output["forward_ddf"].shape[0]
            items = [
                {k: (v[i] if isinstance(v, (torch.Tensor, list, tuple)) else v) for k, v in output.items()}
                for i in range(size)
            ]
        else:
            items = list(output)
        with warnings.catch_warnings():
            # MONAI's metric internals warn about empty channels and a deprecated argument they pass themselves
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            for item in items:
                self.rows.append(pair_metrics(item, self.labels, self.hd95, len(self.rows)))

    def summary(self) -> dict[str, dict[str, float]]:
        """``{column: {"mean", "std", "count"}}`` over pairs for every numeric column, NaN/inf ignored."""
        columns = [c for c in dict.fromkeys(k for row in self.rows for k in row) if not c.endswith("_name")]
        out = {}
        for column in columns:
            values = torch.tensor([row.get(column, math.nan) for row in self.rows], dtype=torch.float64)
            finite = values[torch.isfinite(values)]
            out[column] = {
                "mean": float(finite.mean()) if finite.numel() else math.nan,
                "std": float(finite.std(unbiased=False)) if finite.numel() else math.nan,
                "count": int(finite.numel()),
            }
        return out

    def compute(self) -> float:
        if not self.rows:
            raise ValueError("RegistrationMetrics received no pairs")
        return self.summary().get("dice", {"mean": math.nan})["mean"]

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        summary = self.summary()
        for column, stats in summary.items():
            if not column.startswith("dice_label_"):
                engine.state.metrics[f"{self.prefix}{column}"] = stats["mean"]
        if self.output_dir is not None:
            self.write(self.output_dir, summary)

    def write(self, output_dir: str | os.PathLike, summary: Mapping[str, Mapping[str, float]] | None = None) -> None:
        """Write ``per_pair.csv``, ``summary.csv`` and ``summary.json`` into ``output_dir`` (atomic renames)."""
        output_dir = Path(output_dir)
        summary = self.summary() if summary is None else summary
        fields = list(dict.fromkeys(k for row in self.rows for k in row))

        def per_pair(stream):
            writer = csv.DictWriter(stream, fieldnames=fields, restval="nan")
            writer.writeheader()
            writer.writerows(self.rows)

        def summary_csv(stream):
            writer = csv.writer(stream)
            writer.writerow(["metric", "mean", "std", "count"])
            writer.writerows([c, s["mean"], s["std"], s["count"]] for c, s in summary.items())

        _write_text(output_dir / "per_pair.csv", per_pair)
        _write_text(output_dir / "summary.csv", summary_csv)
        strict = {
            c: {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in s.items()}
            for c, s in summary.items()
        }
        payload = {"num_pairs": len(self.rows), "metrics": strict}  # non-finite -> null (strict JSON)
        _write_text(output_dir / "summary.json", lambda stream: json.dump(payload, stream, indent=2))
