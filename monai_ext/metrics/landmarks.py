"""Target registration error (TRE) on corresponding landmarks as an ignite ``Metric`` for MONAI's evaluators.

Lung250M-4B and NLST ship corresponding points of both images of a case. The SITReg authors' evaluator maps
the fixed (image 2) landmarks by the forward DDF and measures their distance to the moving (image 1)
landmarks, and the moving landmarks by the inverse DDF against the fixed ones; landmarks outside the field of
view of either image are dropped.

The landmarks are read from ``engine.state.batch`` (:class:`~monai_ext.engines.registration.RegistrationEvalIteration`
copies only non-tensor batch items into ``engine.state.output``) and the DDFs from ``engine.state.output``;
both may be decollated lists (MONAI's default) or batched dicts.

Downsampled inputs (Lung250M-4B: 2x average pooling) give DDFs on the coarse grid while the landmarks
stay in full-resolution voxels: a full-resolution point ``p`` is coarse voxel ``(p - (f - 1) / 2) / f``
(the pooling window centre, :class:`monai_ext.data.base.AvgPoold`), and the coarse displacement times
``f`` is the full-resolution one. The DDF is interpolated linearly there (SITReg upsamples it with
cubic-spline interpolation first; for the smooth SITReg fields the two differ far below a voxel).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.metrics import Metric

from monai_ext.data.atomic import atomic_output
from monai_ext.metrics.deformation import target_registration_error

__all__ = ["LandmarkTRE"]


class LandmarkTRE(Metric):
    """Mean TRE per pair, averaged over pairs (``compute()``; lower is better), in voxels or mm.

    Per pair, with ``u_f`` = ``forward_ddf`` (fixed grid -> moving image) and ``u_i`` = ``inverse_ddf``:

    * ``tre``: mean over landmarks of ``|| s (q + u_f(q) - p) ||`` (``q`` fixed, ``p`` moving landmarks);
    * ``tre_inverse``: the same with ``u_i`` from ``p`` to ``q`` (if ``inverse_ddf`` is in the output);
    * ``tre_initial``: ``|| s (q - p) ||`` (no registration).

    On completion ``<prefix>tre_inverse`` and ``<prefix>tre_initial`` (means over pairs) are also put into
    ``engine.state.metrics``; :attr:`rows` keeps the per-pair values, and with ``output_dir`` they are written
    to ``output_dir/tre.json`` (``{"num_pairs", "metrics": {column: {"mean", "std", "count"}}, "per_pair"}``,
    NaN as ``null``) on every run.

    Args:
        moving_points_key, fixed_points_key: batch keys of the ``(N, n)`` voxel landmarks (``(B, N, n)``
            collated) of the moving and the fixed image, full-resolution voxels.
        downsample: factor between the landmarks' grid and the DDF grid (Lung250M-4B: 2).
        spacing: voxel size (mm) of the landmarks' grid per axis, or ``None`` for voxel units.
        prefix: prefix of the extra ``engine.state.metrics`` keys.
        output_dir: folder of ``tre.json``; ``None`` writes nothing.
        output_transform: applied to ``engine.state.output`` first.
    """

    def __init__(
        self,
        moving_points_key: str = "moving_landmarks",
        fixed_points_key: str = "fixed_landmarks",
        downsample: int = 1,
        spacing: Sequence[float] | None = None,
        prefix: str = "val_",
        output_dir: str | os.PathLike | None = None,
        output_transform: Callable = lambda x: x,
    ) -> None:
        if int(downsample) < 1:
            raise ValueError(f"downsample must be a positive integer, got {downsample}")
        if spacing is not None and (len(spacing) == 0 or min(spacing) <= 0):
            raise ValueError(f"spacing must hold positive voxel sizes, got {spacing}")
        self.keys = (moving_points_key, fixed_points_key)
        self.downsample = int(downsample)
        self.spacing = None if spacing is None else [float(s) for s in spacing]
        self.prefix = prefix
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.rows: list[dict[str, float]] = []
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self.rows = []

    def iteration_completed(self, engine: Any) -> None:
        self.update((self._output_transform(engine.state.output), engine.state.batch))

    @staticmethod
    def _items(data: Mapping[str, Any] | Sequence[Mapping[str, Any]], size_key: str) -> list[Mapping[str, Any]]:
        if not isinstance(data, Mapping):
            return list(data)
        size = data[size_key].shape[0]
        return [{k: (v[i] if isinstance(v, (torch.Tensor, list, tuple)) else v) for k, v in data.items()} for i in range(size)]

    def _tre(self, ddf: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> float:
        """Mean TRE of one pair: ``ddf`` ``(n, *coarse)`` maps ``source`` points to ``target`` points (``(N, n)``)."""
        f = self.downsample
        # on the coarse grid the residual is ((q - p) / f + u(q_c)); times f it is the full-resolution one
        source_c, target_c = ((points - (f - 1) / 2) / f for points in (source, target))
        spacing = [f * s for s in self.spacing] if self.spacing is not None else [float(f)] * source.shape[1]
        distances = target_registration_error(ddf[None], source_c[None], target_c[None], spacing=spacing)
        return float(distances.mean())

    def update(self, output_and_batch: tuple[Any, Any]) -> None:
        """Add the pairs of one iteration: ``(engine output, engine batch)``, each decollated or batched."""
        output, batch = output_and_batch
        outputs = self._items(output, "forward_ddf")
        batches = self._items(batch, self.keys[0])
        if len(outputs) != len(batches):
            raise ValueError(f"engine output holds {len(outputs)} pairs but the batch {len(batches)}")
        for item, points in zip(outputs, batches):
            if "forward_ddf" not in item:
                raise ValueError(f"engine output must contain 'forward_ddf', got keys {sorted(item)}")
            if any(k not in points for k in self.keys):
                raise ValueError(f"batch must contain {self.keys}, got keys {sorted(points)}")
            forward_ddf = torch.as_tensor(item["forward_ddf"]).double()
            n = forward_ddf.shape[0]
            moving, fixed = (torch.as_tensor(points[k]).to(forward_ddf.device, torch.float64) for k in self.keys)
            if moving.shape != fixed.shape or moving.ndim != 2 or moving.shape[1] != n:
                raise ValueError(
                    f"{self.keys[0]} {tuple(moving.shape)} and {self.keys[1]} {tuple(fixed.shape)} must both be (N, {n})"
                )
            full_shape = torch.tensor(forward_ddf.shape[1:], dtype=torch.float64, device=moving.device) * self.downsample
            inside = ((moving >= 0) & (moving <= full_shape - 1) & (fixed >= 0) & (fixed <= full_shape - 1)).all(1)
            row = {"tre": math.nan, "tre_inverse": math.nan, "tre_initial": math.nan, "num_landmarks": int(inside.sum())}
            if inside.any():
                moving, fixed = moving[inside], fixed[inside]
                spacing = torch.tensor(self.spacing or [1.0] * n, dtype=torch.float64, device=moving.device)
                row["tre_initial"] = float(((fixed - moving) * spacing).norm(dim=1).mean())
                row["tre"] = self._tre(forward_ddf, fixed, moving)
                if item.get("inverse_ddf") is not None:
                    row["tre_inverse"] = self._tre(torch.as_tensor(item["inverse_ddf"]).double(), moving, fixed)
            self.rows.append(row)

    def summary(self) -> dict[str, dict[str, float]]:
        """``{column: {"mean", "std", "count"}}`` over pairs, NaN ignored."""
        out = {}
        for column in ("tre", "tre_inverse", "tre_initial", "num_landmarks"):
            values = torch.tensor([row[column] for row in self.rows], dtype=torch.float64)
            finite = values[torch.isfinite(values)]
            empty = not finite.numel()
            out[column] = {
                "mean": math.nan if empty else float(finite.mean()),
                "std": math.nan if empty else float(finite.std(unbiased=False)),
                "count": int(finite.numel()),
            }
        return out

    def _mean(self, column: str) -> float:
        return self.summary()[column]["mean"]

    def compute(self) -> float:
        if not self.rows:
            raise ValueError("LandmarkTRE received no pairs")
        return self._mean("tre")

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        for column in ("tre_inverse", "tre_initial"):
            engine.state.metrics[f"{self.prefix}{column}"] = self._mean(column)
        if self.output_dir is not None:
            def strict(value):  # non-finite -> null (strict JSON)
                return None if isinstance(value, float) and not math.isfinite(value) else value

            payload = {
                "num_pairs": len(self.rows),
                "metrics": {c: {k: strict(v) for k, v in s.items()} for c, s in self.summary().items()},
                "per_pair": [{k: strict(v) for k, v in row.items()} for row in self.rows],
            }
            # a unique temporary name per writer: several processes (DDP ranks) may write the same file
            with atomic_output(self.output_dir / "tre.json") as partial, open(partial, "w") as stream:
                json.dump(payload, stream, indent=2)
