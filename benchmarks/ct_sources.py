"""CT-sized synthetic sources for the data-pipeline benchmarks, kept between runs in a work folder."""
from pathlib import Path

from ..volumes.phantoms import write_phantom_corpus

FULL_SOURCE = (512, 512, 300)  # x, y, z: a typical chest CT
QUICK_SOURCE = (256, 256, 160)


def ct_sources(work_dir: Path, count: int, size: tuple[int, int, int]) -> Path:
    """A folder of `count` int16 .nii.gz phantoms of grid `size` (written once, then reused)."""
    folder = Path(work_dir) / f"sources_{'x'.join(map(str, size))}"
    write_phantom_corpus(folder, count=count, seed=7, size=size)
    return folder
