"""Synthetic CT-like phantoms written as real NIfTI files: the built-in corpus of `make demo`.

Each phantom is defined in physical (LPS, mm) space: a body of soft tissue wrapped in fat, two
lungs, a heart, a liver, two kidneys, a spine and an aorta, with jittered sizes, positions and HU
values plus noise. Each file gets its own grid size, spacing and axis order/flips, so the
corpus exercises reading, reorientation and resampling the way a real one does.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

AIR_HU = -1000.0


@dataclass(frozen=True)
class Ellipsoid:
    centre: tuple[float, float, float]  # mm, LPS
    radii: tuple[float, float, float]  # mm
    hu: float


def _anatomy(rng: np.random.Generator) -> list[Ellipsoid]:
    """Organs as ellipsoids, painted in order (later ones overwrite earlier ones)."""
    scale = rng.uniform(0.85, 1.15)

    def jitter(centre, radii, hu):
        c = tuple(float(v) * scale + rng.normal(0, 6) for v in centre)
        r = tuple(float(v) * scale * rng.uniform(0.9, 1.1) for v in radii)
        return Ellipsoid(c, r, hu + rng.normal(0, 8))

    long_axis = 1000.0  # "cylinders" along the superior axis are very long ellipsoids
    return [
        jitter((0, 0, 0), (165, 115, long_axis), -100),  # subcutaneous fat
        jitter((0, 0, 0), (150, 100, long_axis), 40),  # soft tissue
        jitter((-70, 0, 60), (55, 70, 110), -850),  # right lung (patient's right is -x in LPS)
        jitter((70, 0, 60), (50, 70, 110), -850),  # left lung
        jitter((20, -20, 30), (45, 40, 50), 45),  # heart
        jitter((-60, 0, -70), (70, 60, 55), 60),  # liver
        jitter((-60, 50, -110), (22, 22, 45), 30),  # right kidney
        jitter((60, 50, -100), (22, 22, 45), 30),  # left kidney
        jitter((0, 75, 0), (16, 16, long_axis), 700),  # spine
        jitter((15, 40, 0), (11, 11, long_axis), 150),  # aorta (contrast)
    ]


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    """An axis permutation with random flips: what scanners and converters produce."""
    direction = np.zeros((3, 3))
    for column, axis in enumerate(rng.permutation(3)):
        direction[axis, column] = rng.choice([-1.0, 1.0])
    return direction


def make_phantom(rng: np.random.Generator, size_range: tuple[int, int] = (40, 80)) -> sitk.Image:
    """One int16 CT phantom in HU on a random grid, spacing and orientation."""
    size = rng.integers(size_range[0], size_range[1] + 1, size=3)
    fov = np.array([rng.uniform(380, 440), rng.uniform(380, 440), rng.uniform(250, 400)])  # LPS mm
    direction = _random_direction(rng)
    # The physical axis each image axis runs along sets that axis' spacing.
    spacing = np.array([fov[np.argmax(np.abs(direction[:, i]))] / size[i] for i in range(3)])
    centre = rng.normal(0, 10, size=3)
    origin = centre - direction @ ((size - 1) / 2.0 * spacing)

    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)
    points = origin + (index * spacing) @ direction.T  # (x, y, z, 3) physical positions
    hu = np.full(tuple(size), AIR_HU)
    for organ in _anatomy(rng):
        inside = (((points - organ.centre) / organ.radii) ** 2).sum(axis=-1) <= 1.0
        hu[inside] = organ.hu
    hu += rng.normal(0, rng.uniform(10, 30), size=hu.shape)

    image = sitk.GetImageFromArray(np.clip(hu, -1024, 3071).astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.ravel().tolist())
    return image


def write_phantom_corpus(output_dir: str | Path, count: int = 24, seed: int = 0,
                         size_range: tuple[int, int] = (40, 80), progress: bool = True) -> list[Path]:
    """Write `count` phantoms as `phantom_XXX.nii.gz` (skipping files already there)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range(count), desc="phantoms", disable=not progress):
        path = output_dir / f"phantom_{i:03d}.nii.gz"
        if not path.exists():
            image = make_phantom(np.random.default_rng([seed, i]), size_range)
            tmp = path.with_name(f".tmp_{path.name}")
            sitk.WriteImage(image, str(tmp))
            tmp.replace(path)
        paths.append(path)
    return paths
