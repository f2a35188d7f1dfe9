"""The bundle's output: one CSV row per volume (its path, then the class probabilities of a classifier or the
embedding of an encoder), appended as each batch is postprocessed."""
import csv
from pathlib import Path

import torch
from monai.transforms import MapTransform


class WriteRowsd(MapTransform):
    """data[key] (one volume's K values, as the evaluator hands each volume to its postprocessing) -> a row of
    `output_file` under `columns`, after the path the input image's meta names."""

    def __init__(self, keys, output_file: str, columns: list[str], image_key: str = "image"):
        super().__init__(keys)
        self.output_file, self.columns, self.image_key = Path(output_file), list(columns), image_key

    def __call__(self, data: dict) -> dict:
        for key in self.key_iterator(data):
            values = torch.as_tensor(data[key]).detach().float().cpu().reshape(-1, len(self.columns))
            path = getattr(data[self.image_key], "meta", {}).get("filename_or_obj", "")
            paths = [path] if isinstance(path, str) else list(path)
            new = not self.output_file.exists()
            self.output_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.output_file, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["path", *self.columns])
                for path, row in zip(paths, values.tolist()):
                    writer.writerow([path, *(repr(float(v)) for v in row)])
        return data
