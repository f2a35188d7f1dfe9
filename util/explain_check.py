"""Do the explanations point at the evidence? Train a model on a task whose evidence is known (a blob,
datasets.blobs), then measure, on the positive test volumes, the share of the explanation's mass inside
the blob against the blob's share of the volume (1 = no better than a uniform map)."""
import numpy as np
import torch

from .explain import explain, mass_share, method_for


def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for batch in order.split(16):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def blob_explanation_ratio(model: torch.nn.Module, train_set: tuple, test_set: tuple, epochs: int = 8,
                           lr: float = 1e-3) -> dict:
    """Train `model` on (volumes, labels, masks) and score its explanations of the positive test volumes."""
    x, y, _ = train_set
    tx, ty, masks = test_set
    train(model, x, y, epochs, lr)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(tx)).argmax(1).numpy() == ty).mean())
    positive = np.flatnonzero(ty == 1)
    heat = explain(model, torch.from_numpy(tx[positive]), torch.ones(len(positive), dtype=torch.long))
    inside = [mass_share(h, m) for h, m in zip(heat, masks[positive])]
    share = float(masks[positive].mean())
    return {"method": method_for(model), "test_accuracy": accuracy, "mass_inside_blob": float(np.mean(inside)),
            "blob_volume_share": share, "ratio": float(np.mean(inside) / share)}
