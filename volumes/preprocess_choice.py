"""`--resample auto`: the resampling, spacing and grid chosen from a set's headers, with the reason printed.

Two kinds of sets need different treatment:
  - volumes that all cover about the same field of view (whole scans of one body region, brain crops):
    `fit` keeps every volume whole at one isotropic spacing per volume, and the spacings differ little;
  - crops whose physical extents differ (lesion crops cut to a fixed number of voxels at varying pixel
    sizes): `fit` would scale each crop to fill the grid and throw away its physical size, which is often
    the label's strongest signal. `spacing` resamples every volume to one common isotropic spacing and a
    grid that covers most extents (centre-cropped beyond, padded with background below).
The set is told apart by the spread of its largest physical extents (90th over 10th percentile).
"""
import math
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .orientation import canonical_geometry
from .preprocess import PreprocessConfig
from .reading import MAX_VOXELS, VolumeReadError, read_header

# Largest extents spreading more than this (P90 / P10) mean fitting would rescale volumes differently.
MAX_FIT_SPREAD = 1.25
COVERAGE = 0.9  # the grid covers this share of the set's extents along each axis
GRID_MULTIPLE = 8  # grid axes are multiples of this, so that patches of 2, 4 and 8 voxels tile them
MAX_AUTO_EDGE = 256
# An automatic grid holds at most this many voxels (48 x 32 x 32, about 36^3): a study's cost grows with them, and
# on a 2-core CPU a grid of this size keeps one seed's pretraining and fine-tuning near an hour (docs/results.md).
# Where the finest spacing would need more, the spacing grows until the grid fits; --input_size sets any grid.
AUTO_VOXEL_BUDGET = 48 * 32 * 32
SURVEY_LIMIT = 512  # headers read at most (evenly spread), so a corpus of thousands is surveyed in seconds


@dataclass
class HeaderSurvey:
    """Canonical (D, H, W) sizes and spacings of the readable sources of a set."""
    sizes: np.ndarray  # (N, 3) voxels
    spacings: np.ndarray  # (N, 3) mm
    total: int  # sources in the set
    unreadable: dict[str, str] = field(default_factory=dict)

    @property
    def extents(self) -> np.ndarray:
        return self.sizes * self.spacings

    def to_dict(self) -> dict:
        extent = np.percentile(self.extents, [10, 50, 90], axis=0).round(2).tolist()
        return {"surveyed": len(self.sizes), "sources": self.total, "unreadable": len(self.unreadable),
                "extent_mm_p10_p50_p90": extent,
                "spacing_mm_median": np.median(self.spacings, axis=0).round(4).tolist()}


def survey_headers(sources: list[str], max_voxels: int = MAX_VOXELS, limit: int = SURVEY_LIMIT,
                   progress: bool = True) -> HeaderSurvey:
    """Read the headers of (at most `limit`, evenly spread) sources; unreadable ones are listed, not fatal."""
    pick = sorted(set(np.linspace(0, len(sources) - 1, min(limit, len(sources))).round().astype(int).tolist()))
    sizes, spacings, unreadable = [], [], {}
    for i in tqdm(pick, desc="reading headers", unit="vol", leave=False, disable=not progress):
        try:
            header = read_header(sources[i], max_voxels)
        except (VolumeReadError, OSError) as err:
            unreadable[sources[i]] = str(err)
            continue
        size, spacing = canonical_geometry(header.size, header.spacing, header.direction)
        sizes.append(size)
        spacings.append(spacing)
    if not sizes:
        raise VolumeReadError(f"none of the {len(pick)} surveyed sources has a readable header")
    return HeaderSurvey(np.array(sizes, dtype=np.float64), np.array(spacings, dtype=np.float64), len(sources),
                        unreadable)


@dataclass(frozen=True)
class PreprocessChoice:
    config: PreprocessConfig
    reason: str
    survey: dict

    def to_dict(self) -> dict:
        return {"resample": self.config.resample, "size": list(self.config.size),
                "spacing": list(self.config.spacing) if self.config.spacing else None, "reason": self.reason,
                "survey": self.survey}


def _round_up(value: float, multiple: int = GRID_MULTIPLE) -> int:
    return max(multiple, int(math.ceil(value / multiple - 1e-9)) * multiple)


def choose_preprocess(survey: HeaderSurvey, base: PreprocessConfig, size: tuple[int, int, int] | None = None,
                      ) -> PreprocessChoice:
    """The resampling for this set (module docstring). `size` fixes the grid; without it the grid is chosen:
    in `spacing` mode the 90th-percentile extent at the median finest spacing, in `fit` mode the median
    extent at that spacing, each axis rounded up to a multiple of 8 and at most 256."""
    extents = survey.extents
    largest = extents.max(axis=1)
    low, high = np.percentile(largest, [10, 90])
    spread = float(high / max(low, 1e-6))
    finest = float(np.median(survey.spacings.min(axis=1)))
    covered = np.percentile(extents, COVERAGE * 100, axis=0)
    facts = (f"largest extents {low:.1f}-{high:.1f} mm (10th-90th percentile, x{spread:.2f}), median finest "
             f"spacing {finest:.3g} mm, 90th-percentile extent {'x'.join(f'{e:.1f}' for e in covered)} mm (D x H x W)")
    if spread <= MAX_FIT_SPREAD:
        median = np.median(extents, axis=0)
        spacing = budget_spacing(median, finest, 16)
        grid = size or _grid(median, spacing, 16)
        config = _with(base, size=grid, resample="fit", spacing=None)
        cost = "" if size else f" on a grid of {_budget_note(grid, spacing, finest)}"
        reason = (f"fit: the volumes cover similar fields of view ({facts}); each is kept whole at one isotropic "
                  f"spacing, which varies by at most x{spread:.2f} across the set{cost}")
        return PreprocessChoice(config, reason, survey.to_dict())
    if size is None:
        spacing = budget_spacing(covered, finest, GRID_MULTIPLE)
        grid = _grid(covered, spacing, GRID_MULTIPLE)
        how = (f"the coarser of the median finest spacing and the spacing whose grid covering 90% of the extents per "
               f"axis fits the voxel budget: {_budget_note(grid, spacing, finest)}")
    else:
        grid = tuple(size)
        spacing = max(finest, float(max(e / g for e, g in zip(covered, grid))))
        how = (f"{spacing:.3g} mm, so that the given grid covers 90% of the extents per axis "
               f"(never finer than the median finest spacing)")
    config = _with(base, size=grid, resample="spacing", spacing=(spacing,) * 3)
    reason = (f"spacing: the physical extents differ ({facts}), so fitting each volume to the grid would lose its "
              f"physical size; one isotropic spacing for all: {how}: {'x'.join(map(str, grid))} voxels")
    return PreprocessChoice(config, reason, survey.to_dict())


def _grid(extent: np.ndarray, spacing: float, multiple: int) -> tuple[int, ...]:
    return tuple(min(MAX_AUTO_EDGE, _round_up(e / spacing, multiple)) for e in extent)


def budget_spacing(extent: np.ndarray, finest: float, multiple: int, budget: int = AUTO_VOXEL_BUDGET) -> float:
    """The finest isotropic spacing, not below `finest`, at which the grid covering `extent` holds at most
    `budget` voxels. The voxel count only falls as the spacing grows, and changes where an axis's extent is a
    whole number of `multiple`-voxel blocks, so the answer is `finest` or one of those spacings."""
    blocks = [e / (k * multiple) for e in extent for k in range(1, int(e / (finest * multiple)) + 2)]
    candidates = sorted({finest, *(b for b in blocks if b > finest)})
    return next((s for s in candidates if math.prod(_grid(extent, s, multiple)) <= budget), candidates[-1])


def _budget_note(grid: tuple[int, ...], spacing: float, finest: float) -> str:
    voxels = math.prod(grid)
    coarser = f", coarser than the median finest {finest:.3g} mm to fit" if spacing > finest * 1.0001 else ""
    return (f"{spacing:.3g} mm{coarser}, {voxels:,} voxels (budget {AUTO_VOXEL_BUDGET:,}; --input_size sets any "
            f"grid)")


def _with(base: PreprocessConfig, **changes) -> PreprocessConfig:
    return PreprocessConfig.from_dict({**base.to_dict(), **changes})
