"""A toy task for explanations: whether a bright blob is present somewhere in a noisy volume, with the
blob's mask, so a map's mass inside the blob can be measured (util.explain_check)."""
import numpy as np


def blob_volumes(count: int, size: int, radius: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(volumes (N, 1, S, S, S), labels, blob masks): unit-variance noise, and in half of them a ball
    4.5 standard deviations bright. The volumes are standardised as a z-scored scan would be: in [0, 1]
    units the same blob is faint beside the classifier's unit-amplitude sin-cos positional embedding,
    and a ViT trained from scratch for a few hundred steps then stays at chance for some seeds."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=-1)
    volumes = rng.normal(0.0, 1.0, size=(count, 1, size, size, size)).astype(np.float32)
    labels = (np.arange(count) % 2).astype(np.int64)
    masks = np.zeros((count, size, size, size), dtype=bool)
    for i in np.flatnonzero(labels):
        centre = rng.uniform(radius + 1, size - radius - 2, size=3)
        masks[i] = ((grid - centre) ** 2).sum(-1) <= radius ** 2
        volumes[i, 0][masks[i]] += 4.5
    return volumes, labels, masks
