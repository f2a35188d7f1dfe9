"""Synthetic CT-like phantoms written as real NIfTI files: the built-in corpus of `make demo`.

Each phantom is defined in physical (LPS, mm) space: a body of soft tissue wrapped in fat, two
lungs, a heart, a liver, two kidneys, a spine and an aorta, with jittered sizes, positions and HU
values plus noise. Each file gets its own grid size, spacing and axis order/flips, so the
corpus exercises reading, reorientation and resampling the way a real one does.

`write_labelled_corpus` writes a labelled corpus for the demo's classifier: half of the phantoms carry a solid
soft-tissue mass in one lung, and `labels.csv` says which (`lesion` 0/1, one patient per phantom).
`python main_phantoms.py` writes either from the command line.
"""
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from ..util.atomic import atomic_write

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


def _lung_mass(rng: np.random.Generator, anatomy: list[Ellipsoid]) -> Ellipsoid:
    """A lung mass (a solid lesion over 3 cm): a ball of soft tissue 48-64 mm across, centred in the inner 20%
    of the right or left lung, so that air surrounds most of it. Nodules of 2-4 cm are a voxel or two on the
    demo's 32^3 grid, and masses near the lung's border look like the heart's or the liver's dome there; a
    small classifier then stays at the prior for the demo's whole budget."""
    lung = anatomy[2 + int(rng.integers(2))]
    direction = rng.normal(size=3)
    offset = direction / np.linalg.norm(direction) * rng.uniform(0.0, 0.2)
    centre = tuple(float(c + r * o) for c, r, o in zip(lung.centre, lung.radii, offset))
    radius = float(rng.uniform(24, 32))
    return Ellipsoid(centre, (radius, radius, radius), 40 + rng.normal(0, 8))


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    """An axis permutation with random flips: what scanners and converters produce."""
    direction = np.zeros((3, 3))
    for column, axis in enumerate(rng.permutation(3)):
        direction[axis, column] = rng.choice([-1.0, 1.0])
    return direction


def _ellipsoid_mask(organ: Ellipsoid, origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray,
                    size: np.ndarray) -> np.ndarray:
    """Voxels inside an ellipsoid. The direction is a signed permutation, so each physical axis
    depends on one index axis and the test is a sum of three broadcast 1D terms."""
    total = np.zeros((1, 1, 1), dtype=np.float32)
    for k in range(3):
        axis = int(np.argmax(np.abs(direction[k])))
        coordinate = origin[k] + direction[k, axis] * np.arange(size[axis]) * spacing[axis]
        term = (((coordinate - organ.centre[k]) / organ.radii[k]) ** 2).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = -1
        total = total + term.reshape(shape)
    return total <= 1.0


def make_phantom(rng: np.random.Generator, size_range: tuple[int, int] = (40, 80),
                 size: tuple[int, int, int] | None = None, lesion: bool = False) -> sitk.Image:
    """One int16 CT phantom in HU on a random orientation and spacing; grid `size` (x, y, z) or random.
    The mass is drawn after everything else, so a phantom without one is the same with either flag."""
    size = np.array(size) if size is not None else rng.integers(size_range[0], size_range[1] + 1, size=3)
    fov = np.array([rng.uniform(380, 440), rng.uniform(380, 440), rng.uniform(250, 400)])  # LPS mm
    direction = _random_direction(rng)
    # The physical axis each image axis runs along sets that axis' spacing.
    spacing = np.array([fov[np.argmax(np.abs(direction[:, i]))] / size[i] for i in range(3)])
    centre = rng.normal(0, 10, size=3)
    origin = centre - direction @ ((size - 1) / 2.0 * spacing)

    hu = np.full(tuple(size), AIR_HU, dtype=np.float32)
    anatomy = _anatomy(rng)
    noise_sd = rng.uniform(10, 30)
    if lesion:
        anatomy.append(_lung_mass(rng, anatomy))
    for organ in anatomy:
        hu[_ellipsoid_mask(organ, origin, spacing, direction, size)] = organ.hu
    hu += rng.normal(0, noise_sd, size=hu.shape).astype(np.float32)
    hu = np.clip(hu, -1024, 3071).astype(np.int16)

    image = sitk.GetImageFromArray(hu.transpose(2, 1, 0))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.ravel().tolist())
    return image


def write_phantom_corpus(output_dir: str | Path, count: int = 24, seed: int = 0,
                         size_range: tuple[int, int] = (40, 80), progress: bool = True,
                         size: tuple[int, int, int] | None = None, lesions: bool = False) -> list[Path]:
    """Write `count` phantoms as `phantom_XXX.nii.gz` (skipping files already there); with `lesions`, the
    odd-numbered ones carry a lung mass."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range(count), desc="phantoms", disable=not progress):
        path = output_dir / f"phantom_{i:03d}.nii.gz"
        if not path.exists():
            image = make_phantom(np.random.default_rng([seed, i]), size_range, size, lesion=lesions and i % 2 == 1)
            atomic_write(path, lambda tmp, image=image: sitk.WriteImage(image, str(tmp)))
        paths.append(path)
    return paths


def write_labelled_corpus(output_dir: str | Path, count: int = 64, seed: int = 0,
                          size_range: tuple[int, int] = (40, 80), progress: bool = True) -> Path:
    """`count` phantoms, every other one with a lung mass, and `labels.csv` (path relative to it,
    patient_id, lesion); returns the CSV. The labels alternate so that any prefix is balanced."""
    paths = write_phantom_corpus(output_dir, count, seed, size_range, progress, lesions=True)
    rows = [{"path": path.name, "patient_id": f"P{seed:03d}-{i:04d}", "lesion": i % 2} for i, path in enumerate(paths)]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "patient_id", "lesion"])
            writer.writeheader()
            writer.writerows(rows)

    labels = Path(output_dir) / "labels.csv"
    atomic_write(labels, write_csv)
    return labels

