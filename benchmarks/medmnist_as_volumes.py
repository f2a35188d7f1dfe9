"""Write a MedMNIST3D npz as NIfTI volumes and a labels CSV with its official split, so that the own-data
path (`--setup volumes`, launch/recipes/volumes.sh) can be judged on a labelled set nobody tuned it for.

    .venv/bin/python benchmarks/medmnist_as_volumes.py --npz ../shared/data/medmnist/adrenalmnist3d.npz \
        --output_dir /tmp/adrenal_volumes

MedMNIST stores no spacing: the volumes are written at 1 mm, so a 28^3 volume spans 28 mm per axis.
Each volume is its own patient (`pid`): MedMNIST's splits are already by patient.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

SPLITS = ("train", "val", "test")


def write_volumes(npz: Path, output_dir: Path) -> Path:
    """One NIfTI per volume under OUTPUT_DIR/images and OUTPUT_DIR/labels.csv (path, pid, label, split)."""
    arrays = np.load(npz)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 4:
            raise SystemExit(f"error: {npz}: {split}_images has shape {images.shape}; a 3D MedMNIST set is N x D x H x W")
        for index in tqdm(range(len(images)), desc=f"writing {split}", unit="vol"):
            name = f"{split}_{index:04d}"
            path = output_dir / "images" / f"{name}.nii.gz"
            sitk.WriteImage(sitk.GetImageFromArray(images[index]), str(path))
            rows.append({"path": f"images/{name}.nii.gz", "pid": name, "label": int(labels[index].ravel()[0]),
                         "split": split})
    table = output_dir / "labels.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", type=Path, required=True, help="a MedMNIST3D npz (e.g. adrenalmnist3d.npz)")
    parser.add_argument("--output_dir", type=Path, required=True, help="where images/ and labels.csv go")
    args = parser.parse_args()
    print(f"labels: {write_volumes(args.npz, args.output_dir)}")


if __name__ == "__main__":
    main()
