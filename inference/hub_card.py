"""The Hugging Face Hub's model card for an export (`--format hf`): README.md, the card's facts as the Hub's YAML
front matter (license, library, tags, the metrics and scores as a model-index), then the same sections as
MODEL_CARD.md, written with huggingface_hub's own card tools so that the Hub reads it as it reads any card.
Nothing is uploaded."""
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

LIBRARY = "volmae"
METRICS = {"auc": "roc_auc", "acc": "accuracy"}


def hub_card_data(card: dict, license_id: str) -> ModelCardData:
    """The front matter: what the Hub indexes (the task, the data, the test scores beside their floors)."""
    classifier = card["kind"] == "classifier"
    tags = ["medical-imaging", "3d", "masked-autoencoder", "volmae", "image-classification" if classifier
            else "feature-extraction"]
    results = []
    test = (card.get("scores") or {}).get("test") or {}
    data = card.get("data_seen") or {}
    for key, metric in METRICS.items():
        if isinstance(test.get(key), (int, float)):
            results.append(EvalResult(task_type="image-classification", dataset_type="volumes",
                                      dataset_name="the run's test split (split by patient)", metric_type=metric,
                                      metric_value=float(test[key])))
    return ModelCardData(license=license_id, library_name=LIBRARY, tags=tags,
                         pipeline_tag="image-classification" if classifier else "image-feature-extraction",
                         metrics=[METRICS[k] for k in METRICS if isinstance(test.get(k), (int, float))] or None,
                         model_name=f"volmae-{card['model_name']}", eval_results=results or None,
                         volmae={"kind": card["kind"], "input_grid": card["input"]["grid"],
                                 "floors": floor_summary(card.get("floors") or {}), "rows": data.get("rows")})


def floor_summary(floors: dict) -> dict:
    """The floors' scores alone (the PCA floor's search is in config.json)."""
    summary = {key: value for key, value in floors.items() if isinstance(value, (int, float))}
    pca = floors.get("pca_logreg") or {}
    summary.update({f"pca_logreg_{key}": pca[key] for key in ("val_auc", "test_auc") if key in pca})
    return summary


def write_hub_readme(folder: Path, card: dict, body: str, license_id: str) -> Path:
    """README.md: the front matter, then `body` (the MODEL_CARD.md text)."""
    content = f"---\n{hub_card_data(card, license_id).to_yaml()}\n---\n\n{body}"
    path = folder / "README.md"
    ModelCard(content).save(path)
    return path
