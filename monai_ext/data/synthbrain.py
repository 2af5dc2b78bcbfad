"""Brain registration pairs synthesised on the fly from real whole-head label maps (SynthMorph-style).

Training a registration network on images synthesised from label maps, with a new random contrast for
every image and a loss on the warped labels only, makes it contrast-agnostic (Hoffmann et al.,
"SynthMorph: learning contrast-invariant registration without acquired images", IEEE TMI 2022). Here the
label maps are real anatomy (FreeSurfer labels, e.g. the SynthSeg training maps), so the network learns
real inter-subject deformations.

Per image of a pair (:class:`SynthBrainPairDataset`):

1. a label map (usually another subject for each side; with ``mirror`` also the left-right mirror image of
   each map, :func:`mirror_label_map`) is skull-stripped to the intracranial labels
   (:data:`BRAIN_LABELS` + :data:`OTHER_BRAIN_LABELS`; everything else becomes background);
2. a random affine (rotation, scaling, shear, translation; in mm about the brain's centroid) and a
   random smooth displacement (mm) map the model grid into the label map, which is sampled there
   (nearest neighbour). The model grid is RAS with ``spacing`` mm voxels, centred on the brain's centroid,
   so the two images of a pair are roughly (centroid-) aligned, as affinely pre-aligned scans are;
3. the image is synthesised per label (:func:`synthesize_contrast`): a random mean and texture per
   label (or, with probability ``t1_probability``, a T1-weighted-like table), blur, a smooth
   multiplicative bias field, gamma, noise, background 0, then :func:`normalize_intensity`.

Items hold ``moving_image`` / ``fixed_image`` ``(1, D, H, W)`` float32 in ``[0, 1]`` and
``moving_label`` / ``fixed_label`` ``(1, D, H, W)`` int64 *structure indices*: ``k`` in ``1..K`` is
``BRAIN_LABELS[k - 1]``, 0 is everything else. Array axes are the RAS world axes (L->R, P->A, I->S).

No MONAI transform draws these label-driven contrasts or samples a label map through a composed
affine + displacement in world space, hence this module; the blur is MONAI's ``GaussianFilter``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from monai_ext.spatial.sampling import sample, voxel_grid

__all__ = [
    "BRAIN_LABELS",
    "OTHER_BRAIN_LABELS",
    "T1_LIKE_INTENSITIES",
    "BrainLabelMap",
    "load_brain_label_map",
    "mirror_label_map",
    "HEMISPHERE_PAIRS",
    "grid_affine",
    "random_spatial_transform",
    "rotation_about_axis",
    "sample_label_map",
    "synthesize_contrast",
    "normalize_intensity",
    "subtract_background",
    "synthesis_index",
    "structure_labels",
    "HELD_OUT_MAPS",
    "label_map_files",
    "SynthBrainPairDataset",
    "render_pair",
    "held_out_pairs",
]

#: label maps (file names without extension) never used for training: validation and demo only
HELD_OUT_MAPS: tuple[str, ...] = ("training_seg_09", "training_seg_10")

#: FreeSurfer labels of the standard brain structures, both hemispheres: the registration targets and
#: the labels of the Dice loss / evaluation (structure index ``k`` = ``BRAIN_LABELS[k - 1]``)
BRAIN_LABELS: tuple[int, ...] = (
    2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 26, 28,  # left, 3rd/4th ventricle, brainstem
    41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60,  # right
)  # fmt: skip
#: other intracranial FreeSurfer labels kept in the images (vessel, 5th ventricle, WM hypointensities,
#: optic chiasm, choroid plexus) but not registration targets
OTHER_BRAIN_LABELS: tuple[int, ...] = (30, 62, 72, 77, 85, 31, 63)

#: T1-weighted-like mean intensity per FreeSurfer label (white matter bright, CSF dark)
T1_LIKE_INTENSITIES: dict[int, float] = {
    2: 0.85, 41: 0.85, 3: 0.55, 42: 0.55, 4: 0.15, 43: 0.15, 5: 0.2, 44: 0.2, 7: 0.8, 46: 0.8,
    8: 0.55, 47: 0.55, 10: 0.72, 49: 0.72, 11: 0.6, 50: 0.6, 12: 0.65, 51: 0.65, 13: 0.78, 52: 0.78,
    14: 0.15, 15: 0.15, 16: 0.78, 17: 0.55, 53: 0.55, 18: 0.57, 54: 0.57, 26: 0.6, 58: 0.6,
    28: 0.75, 60: 0.75, 30: 0.4, 62: 0.4, 72: 0.15, 77: 0.6, 85: 0.7, 31: 0.4, 63: 0.4,
}  # fmt: skip

_SYNTH_LABELS = BRAIN_LABELS + OTHER_BRAIN_LABELS  # synthesis index k = _SYNTH_LABELS[k - 1]

#: FreeSurfer (left, right) label pairs of the kept labels: a mirrored brain swaps them
HEMISPHERE_PAIRS: tuple[tuple[int, int], ...] = (
    (2, 41), (3, 42), (4, 43), (5, 44), (7, 46), (8, 47), (10, 49), (11, 50), (12, 51), (13, 52),
    (17, 53), (18, 54), (26, 58), (28, 60), (30, 62), (31, 63),
)  # fmt: skip


def synthesis_index(labels: np.ndarray) -> np.ndarray:
    """FreeSurfer label values (any shape, integer-valued) -> uint8 synthesis indices: ``k`` for
    ``(BRAIN_LABELS + OTHER_BRAIN_LABELS)[k - 1]``, 0 for every other value (background, skull, ...)."""
    labels = np.clip(np.rint(np.asarray(labels)).astype(np.int64), 0, None)
    lookup = np.zeros(max(int(labels.max(initial=0)), max(_SYNTH_LABELS)) + 1, dtype=np.uint8)
    lookup[list(_SYNTH_LABELS)] = np.arange(1, len(_SYNTH_LABELS) + 1)
    return lookup[labels]


def structure_labels(synthesis_index: torch.Tensor) -> torch.Tensor:
    """Synthesis indices (``0..len(BRAIN_LABELS) + len(OTHER_BRAIN_LABELS)``) -> structure indices (0..K)."""
    return torch.where(synthesis_index <= len(BRAIN_LABELS), synthesis_index, 0).long()


@dataclass
class BrainLabelMap:
    """A skull-stripped label map in RAS voxel order, cropped to the brain.

    ``index`` ``(X, Y, Z)`` uint8 synthesis indices (0 background, ``k`` = ``(BRAIN_LABELS +
    OTHER_BRAIN_LABELS)[k - 1]``); ``affine`` the 4x4 voxel -> RAS mm map of ``index``; ``centroid`` the
    brain's centroid in RAS mm.
    """

    index: torch.Tensor
    affine: np.ndarray
    centroid: np.ndarray
    name: str = ""


def load_brain_label_map(path: str | os.PathLike, margin: int = 4) -> BrainLabelMap:
    """Load a FreeSurfer label map (NIfTI, any orientation), reorient it to RAS (an exact axis permutation /
    flip), keep the intracranial labels and crop to them with ``margin`` voxels."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))
    labels = np.asarray(image.dataobj)
    if labels.ndim != 3:
        raise ValueError(f"{path}: a 3-D label map is required, got shape {labels.shape}")
    index = synthesis_index(labels)
    inside = np.argwhere(index > 0)
    if inside.size == 0:
        raise ValueError(f"{path}: no FreeSurfer brain label ({BRAIN_LABELS[:4]}...) found")
    low = np.maximum(inside.min(0) - margin, 0)
    high = np.minimum(inside.max(0) + margin + 1, index.shape)
    index = index[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    affine = image.affine @ np.array([[1, 0, 0, low[0]], [0, 1, 0, low[1]], [0, 0, 1, low[2]], [0, 0, 0, 1]], float)
    centroid = (affine @ np.append((inside - low).mean(0), 1.0))[:3]
    return BrainLabelMap(torch.from_numpy(np.ascontiguousarray(index)), affine, centroid, os.path.basename(str(path)))


def mirror_label_map(label_map: BrainLabelMap) -> BrainLabelMap:
    """The left-right mirror image of a brain: the RAS array flipped along its first (L->R) axis, every left
    structure relabelled as its right counterpart and vice versa (:data:`HEMISPHERE_PAIRS`), same voxel grid.

    A plausible new anatomy (brains are roughly, not exactly, symmetric), for training on twice the subjects.
    """
    lookup = torch.arange(len(_SYNTH_LABELS) + 1, dtype=label_map.index.dtype)
    position = {label: k for k, label in enumerate(_SYNTH_LABELS, start=1)}
    for left, right in HEMISPHERE_PAIRS:
        lookup[position[left]], lookup[position[right]] = position[right], position[left]
    index = lookup[label_map.index.flip(0).long()]
    inside = (index > 0).nonzero().double().mean(0).numpy()
    centroid = (label_map.affine @ np.append(inside, 1.0))[:3]
    return BrainLabelMap(index, label_map.affine.copy(), centroid, f"{label_map.name} (mirrored)")


def label_map_files(dataset_dir: str | os.PathLike, division: str) -> list[str]:
    """Sorted NIfTI label maps of ``dataset_dir`` for ``division``: ``"train"`` (all but :data:`HELD_OUT_MAPS`)
    or ``"validate"`` (the held-out ones). Raises ``FileNotFoundError`` naming the folder if none is there."""
    if division not in ("train", "validate"):
        raise ValueError(f"division must be 'train' or 'validate', got {division!r}")
    folder = os.fspath(dataset_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"label-map folder {folder!r} does not exist (set dataset_dir)")
    names = sorted(f for f in os.listdir(folder) if f.endswith((".nii", ".nii.gz")))
    held_out = [f for f in names if f.split(".")[0] in HELD_OUT_MAPS]
    chosen = held_out if division == "validate" else [f for f in names if f not in held_out]
    if not chosen:
        raise FileNotFoundError(f"no {division} label maps (*.nii.gz) in {folder!r}")
    return [os.path.join(folder, f) for f in chosen]


def grid_affine(shape: Sequence[int], spacing: float, centre: Sequence[float]) -> np.ndarray:
    """4x4 voxel -> RAS mm map of an axis-aligned RAS grid of ``shape`` with isotropic ``spacing`` mm whose
    centre ``(shape - 1) / 2`` sits at ``centre`` (mm)."""
    affine = np.diag([float(spacing)] * 3 + [1.0])
    affine[:3, 3] = np.asarray(centre, float) - spacing * (np.asarray(shape, float) - 1) / 2
    return affine


def random_spatial_transform(
    generator: torch.Generator,
    rotation: float = 10.0,
    scaling: float = 0.1,
    shear: float = 0.05,
    translation: float = 5.0,
) -> np.ndarray:
    """Random 4x4 affine about the origin (mm): uniform rotations up to ``rotation`` degrees about each
    axis, log-uniform scaling within ``1 +- scaling``, shear up to ``shear``, translation up to
    ``translation`` mm per axis."""

    def uniform(bound: float, n: int = 3) -> np.ndarray:
        return ((torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * bound).numpy()

    angles = np.deg2rad(uniform(rotation))
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        rot = np.eye(3)
        rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
        matrix = rot @ matrix
    scales = np.exp(uniform(math.log1p(scaling)))
    shears = np.eye(3)
    shears[np.triu_indices(3, 1)] = uniform(shear)
    out = np.eye(4)
    out[:3, :3] = matrix @ np.diag(scales) @ shears
    out[:3, 3] = uniform(translation)
    return out


def rotation_about_axis(axis: Sequence[float], degrees: float) -> np.ndarray:
    """4x4 rotation (mm, about the origin) by ``degrees`` about the unit vector along ``axis`` (RAS)."""
    axis = np.asarray(axis, dtype=np.float64)
    norm = np.linalg.norm(axis)
    if axis.shape != (3,) or not norm > 0:
        raise ValueError(f"axis must be a non-zero 3-vector, got {axis.tolist()}")
    x, y, z = axis / norm
    cross = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    angle = math.radians(float(degrees))
    out = np.eye(4)
    out[:3, :3] = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross  # Rodrigues
    return out


def _smooth_field(
    generator: torch.Generator, channels: int, shape: Sequence[int], control_shape: Sequence[int]
) -> torch.Tensor:
    """Standard-normal values on a coarse ``control_shape`` grid, trilinearly upsampled to ``(channels, *shape)``."""
    coarse = torch.randn((1, channels, *control_shape), generator=generator)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def sample_label_map(
    label_map: BrainLabelMap,
    shape: Sequence[int],
    grid: np.ndarray,
    transform: np.ndarray | None = None,
    displacement: torch.Tensor | None = None,
) -> torch.Tensor:
    """Synthesis indices ``(*shape)`` of ``label_map`` at the grid points ``p`` of ``grid`` (4x4 voxel -> RAS mm)
    mapped to ``c + transform (p - c) + displacement(p)`` (``c`` the brain's centroid; ``displacement``
    ``(3, *shape)`` in mm), nearest neighbour, background outside the map."""
    n = math.prod(shape)
    points = voxel_grid(shape, torch.float64).reshape(3, n)
    world = torch.from_numpy(grid[:3, :3]) @ points + torch.from_numpy(grid[:3, 3:])
    if transform is not None:
        centre = torch.from_numpy(label_map.centroid).view(3, 1)
        world = torch.from_numpy(transform[:3, :3]) @ (world - centre) + torch.from_numpy(transform[:3, 3:]) + centre
    if displacement is not None:
        world = world + displacement.reshape(3, n).double()
    to_voxel = np.linalg.inv(label_map.affine)
    voxels = torch.from_numpy(to_voxel[:3, :3]) @ world + torch.from_numpy(to_voxel[:3, 3:])
    values = sample(label_map.index[None, None].float(), voxels.float().reshape(1, 3, *shape), "nearest", "zeros")
    return values[0, 0].round().to(torch.uint8)


def _percentile(values: torch.Tensor, percentile: float, dtype: torch.dtype) -> torch.Tensor:
    """The ``percentile`` of the non-empty 1-D ``values`` computed in ``dtype``; beyond ``torch.quantile``'s size
    limit (2^24 elements) of an evenly strided subsample of at most 2^22, which is as good for an image."""
    if values.numel() > 1 << 22:
        values = values[:: -(-values.numel() // (1 << 22))]
    return torch.quantile(values.to(dtype), percentile / 100)


def subtract_background(image: torch.Tensor, percentile: float = 0.1) -> torch.Tensor:
    """``image`` minus its ``percentile``-th percentile (a robust minimum), as a floating-point tensor.

    The background of a scan then reads ~0, the value that resampling pads with and that
    :func:`normalize_intensity` expects: scans stored with an offset or z-scored (negative background) get the
    same model input as the plain scan. An image whose background is 0 already is unchanged (the percentile is 0).
    Any shape; ``MetaTensor`` metadata is kept.
    """
    level = float(_percentile(image.flatten(), percentile, torch.float64)) if image.numel() else 0.0
    image = image if image.is_floating_point() else image.float()
    return image if level == 0 else image - level


def normalize_intensity(image: torch.Tensor, percentile: float = 99.5) -> torch.Tensor:
    """``image / q`` clipped to ``[0, 1]``, ``q`` the ``percentile`` of the positive voxels (the model's input
    convention; negative values become 0). Any shape; constant-zero input is returned unchanged."""
    positive = image[image > 0]
    if positive.numel() == 0:
        return image.clamp(min=0)
    scale = _percentile(positive, percentile, torch.float32).clamp(min=1e-12)
    return (image / scale).clamp(0, 1)


def synthesize_contrast(
    index: torch.Tensor, generator: torch.Generator, t1_like: bool = False, spacing: float = 2.0
) -> torch.Tensor:
    """Image ``(*spatial)`` float32 in ``[0, 1]`` from synthesis indices ``(*spatial)`` (0 = background).

    Per label a mean intensity (uniform in [0, 1], or :data:`T1_LIKE_INTENSITIES` + N(0, 0.04) when
    ``t1_like``) and a texture std (up to 0.1, or 0.03); Gaussian blur (sigma uniform in [0.3, 1.2] voxels
    of ``spacing`` mm); a multiplicative bias field ``exp(0.3 g)`` (``g`` smooth
    normal noise on a 4^3 grid); gamma ``exp(N(0, 0.25))``; noise std up to 0.03; background set to 0;
    :func:`normalize_intensity`.
    """
    count = len(_SYNTH_LABELS) + 1
    if t1_like:
        table = torch.tensor([0.0] + [T1_LIKE_INTENSITIES[label] for label in _SYNTH_LABELS])
        means = (table + 0.04 * torch.randn(count, generator=generator)).clamp(0.02, 1)
        stds = 0.03 * torch.rand(count, generator=generator)
    else:
        means = torch.rand(count, generator=generator).clamp(min=0.02)
        stds = 0.1 * torch.rand(count, generator=generator)
    index = index.long()
    image = means[index] + stds[index] * torch.randn(index.shape, generator=generator)
    sigma = 0.3 + 0.9 * float(torch.rand(1, generator=generator))
    image = GaussianFilter(3, sigma)(image[None, None])[0, 0]
    bias = _smooth_field(generator, 1, index.shape, (4, 4, 4))[0]
    image = image * torch.exp(0.3 * bias)
    image = image.clamp(min=0) ** float(torch.exp(0.25 * torch.randn(1, generator=generator)))
    image = image + 0.03 * float(torch.rand(1, generator=generator)) * torch.randn(index.shape, generator=generator)
    image = torch.where(index > 0, image, torch.zeros(()))
    return normalize_intensity(image).float()


class SynthBrainPairDataset(torch.utils.data.Dataset):
    """Random synthetic brain pairs from label maps, a new pair for every item (see the module docstring).

    Args:
        label_maps: paths of FreeSurfer label maps (NIfTI), loaded once.
        shape: model grid ``(D, H, W)`` (RAS axes).
        spacing: model grid spacing in mm.
        pairs_per_epoch: items per epoch.
        seed: item ``i`` of epoch ``e`` is drawn from the seed ``(seed, e, i)``: reproducible, resumable
            and independent of data-loader workers.
        same_subject_probability: chance that both images come from one map (different deformations).
        t1_probability: chance that an image gets the T1-like contrast instead of a random one.
        rotation, scaling, shear, translation: bounds of :func:`random_spatial_transform` per image.
        max_displacement: bound (mm) of the random smooth displacement per image (a smooth normal field on
            a control grid of ``control_spacing`` mm, scaled so its largest component is uniform in
            ``[0, max_displacement]``).
        control_spacing: control-point spacing (mm) of that displacement.
        mirror: also draw the left-right mirror image of every map (:func:`mirror_label_map`) as a subject of
            its own: twice the anatomies.
    """

    def __init__(
        self,
        label_maps: Sequence[str | os.PathLike],
        shape: Sequence[int] = (88, 104, 88),
        spacing: float = 2.0,
        pairs_per_epoch: int = 100,
        seed: int = 0,
        same_subject_probability: float = 0.1,
        t1_probability: float = 0.3,
        rotation: float = 10.0,
        scaling: float = 0.1,
        shear: float = 0.05,
        translation: float = 5.0,
        max_displacement: float = 6.0,
        control_spacing: float = 24.0,
        mirror: bool = False,
    ) -> None:
        if len(label_maps) < 1:
            raise ValueError("label_maps must name at least one label map")
        self.maps = [load_brain_label_map(path) for path in label_maps]
        if mirror:
            self.maps += [mirror_label_map(label_map) for label_map in self.maps]
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"shape must be 3 sizes of at least 8 voxels, got {shape}")
        self.spacing = float(spacing)
        self.pairs_per_epoch = int(pairs_per_epoch)
        self.seed = int(seed)
        self.same_subject_probability = float(same_subject_probability)
        self.t1_probability = float(t1_probability)
        self.affine_bounds = (float(rotation), float(scaling), float(shear), float(translation))
        self.max_displacement = float(max_displacement)
        self.control_shape = tuple(max(2, round(s * self.spacing / control_spacing) + 1) for s in self.shape)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the pairs of ``epoch`` (0-based)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.pairs_per_epoch

    def image(self, label_map: BrainLabelMap, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One random ``(image, structure labels)``, each ``(1, *shape)``, of ``label_map``."""
        transform = random_spatial_transform(generator, *self.affine_bounds)
        amplitude = self.max_displacement * float(torch.rand(1, generator=generator))
        field = _smooth_field(generator, 3, self.shape, self.control_shape)
        field = field * (amplitude / field.abs().amax().clamp(min=1e-6))
        grid = grid_affine(self.shape, self.spacing, label_map.centroid)
        index = sample_label_map(label_map, self.shape, grid, transform, field)
        t1_like = bool(torch.rand(1, generator=generator) < self.t1_probability)
        image = synthesize_contrast(index, generator, t1_like, self.spacing)
        return image[None], structure_labels(index)[None]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.pairs_per_epoch:
            raise IndexError(f"index {index} out of range for {self.pairs_per_epoch} pairs per epoch")
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, int(index))) & (2**62 - 1))
        first = int(torch.randint(len(self.maps), (1,), generator=generator))
        second = first
        if len(self.maps) > 1 and float(torch.rand(1, generator=generator)) >= self.same_subject_probability:
            second = (first + 1 + int(torch.randint(len(self.maps) - 1, (1,), generator=generator))) % len(self.maps)
        moving_image, moving_label = self.image(self.maps[first], generator)
        fixed_image, fixed_label = self.image(self.maps[second], generator)
        return {
            "moving_image": moving_image,
            "fixed_image": fixed_image,
            "moving_label": moving_label,
            "fixed_label": fixed_label,
        }


def render_pair(
    moving: BrainLabelMap,
    fixed: BrainLabelMap,
    shape: Sequence[int],
    spacing: float,
    t1_like: bool,
    generator: torch.Generator,
    moving_transform: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """One pair: each map sampled on a grid centred on its own brain's centroid (as
    :class:`SynthBrainPairDataset`), images synthesised (:func:`synthesize_contrast`) from ``generator``.

    ``moving_transform`` (4x4, mm, about the moving brain's centroid; e.g. :func:`rotation_about_axis`)
    maps the moving grid into the moving map, so the moving anatomy appears transformed by its inverse;
    ``None``: no spatial augmentation.

    Returns ``moving_image`` / ``fixed_image`` ``(1, *shape)`` float32 and ``moving_label`` / ``fixed_label``
    ``(1, *shape)`` int64 structure indices.
    """
    shape = tuple(int(s) for s in shape)
    item: dict[str, torch.Tensor] = {}
    for side, label_map, transform in (("moving", moving, moving_transform), ("fixed", fixed, None)):
        index = sample_label_map(label_map, shape, grid_affine(shape, spacing, label_map.centroid), transform)
        item[f"{side}_image"] = synthesize_contrast(index, generator, t1_like, spacing)[None]
        item[f"{side}_label"] = structure_labels(index)[None]
    return item


def held_out_pairs(
    label_maps: Sequence[str | os.PathLike],
    shape: Sequence[int] = (88, 104, 88),
    spacing: float = 2.0,
    contrasts: Sequence[str] = ("t1", "random"),
    seed: int = 0,
    rotations: Sequence[float] = (0.0,),
) -> list[dict[str, torch.Tensor | str]]:
    """Fixed validation pairs: every ordered pair of distinct ``label_maps`` in every contrast (``"t1"``:
    T1-like, ``"random"``: random) and every moving rotation by :func:`render_pair`. Deterministic for ``seed``.

    ``rotations`` (degrees): for each angle ``a`` the moving image is rotated by ``a`` about a random axis
    (drawn from the pair's seed) through its brain's centroid; ``(0,)`` gives the plain pairs.

    Items are :func:`render_pair` items plus ``moving_name`` / ``fixed_name`` (``<map>_<contrast>``, the
    moving one with ``_rot<a>`` for ``a != 0``) and ``rotation`` (degrees, float).
    """
    maps = [load_brain_label_map(path) for path in label_maps]
    pairs = []
    for contrast_index, contrast in enumerate(contrasts):
        if contrast not in ("t1", "random"):
            raise ValueError(f"contrast must be 't1' or 'random', got {contrast!r}")
        for i, moving in enumerate(maps):
            for j, fixed in enumerate(maps):
                if i == j:
                    continue
                for angle in rotations:
                    generator = torch.Generator().manual_seed(seed + 1000 * contrast_index + 10 * i + j)
                    transform = None
                    if angle:
                        transform = rotation_about_axis(torch.randn(3, generator=generator, dtype=torch.float64).numpy(), angle)
                    item: dict[str, torch.Tensor | str] = dict(
                        render_pair(moving, fixed, shape, spacing, contrast == "t1", generator, transform)
                    )
                    suffix = f"_rot{angle:g}" if angle else ""
                    item["moving_name"] = f"{moving.name.split('.')[0]}_{contrast}{suffix}"
                    item["fixed_name"] = f"{fixed.name.split('.')[0]}_{contrast}"
                    item["rotation"] = float(angle)
                    pairs.append(item)
    return pairs
