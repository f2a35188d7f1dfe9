"""A Dataset that reads and preprocesses volume files on the fly (for small corpora).

A source that fails to load does not stop training: its item carries the error instead of a
volume, `collate_volumes` drops it from the batch and reports it, and the run counts it.
"""
import torch
from torch.utils.data import Dataset

from datasets.preprocess import PreprocessConfig, load_volume
from datasets.reading import VolumeReadError


class VolumeFileDataset(Dataset):
    def __init__(self, sources: list[str], config: PreprocessConfig):
        self.sources = list(sources)
        self.config = config

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict:
        source = self.sources[index]
        try:
            volume = torch.from_numpy(load_volume(source, self.config))
        except (VolumeReadError, RuntimeError, OSError) as err:
            return {"volume": None, "index": index, "source": source, "error": str(err)}
        return {"volume": volume, "index": index, "source": source, "error": ""}


def collate_volumes(items: list[dict]) -> dict:
    """Stack the loaded volumes; list the failed sources with their reasons."""
    loaded = [item for item in items if item["volume"] is not None]
    return {
        "volume": torch.stack([item["volume"] for item in loaded]) if loaded else None,
        "index": torch.tensor([item["index"] for item in loaded], dtype=torch.long),
        "failed": [(item["source"], item["error"]) for item in items if item["volume"] is None],
    }
