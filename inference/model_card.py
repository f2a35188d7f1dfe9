"""The facts an exported model carries (config.json's `card`) and the MODEL_CARD.md written from them.

The sections follow the field's model cards (MONAI bundle metadata, Hugging Face model cards) without their
hub-specific parts: what the model is, its input and preprocessing, what it was trained on, its scores
beside their floors, intended use and known limits.
"""
import json
from pathlib import Path

import torch

LAYOUT = ("N, C, D, H, W: VolMAE reads every volume with SimpleITK and reorients it to LPS (DICOMOrient), so "
          "D runs inferior to superior, H anterior to posterior, W right to left; the array is SimpleITK's "
          "GetArrayFromImage of that image")
SCORE_KEYS = ("auc", "auc_ci95", "acc", "test_acc_at_val_threshold", "r2", "pearson", "at_prior")


def card_facts(checkpoint: dict, results: dict | None, source: Path) -> dict:
    """What a reader of the export needs, from the checkpoint and the run's results.json (when beside it)."""
    config = checkpoint.get("model_config", {})
    weights = checkpoint.get("model", {})
    classifier = checkpoint.get("kind") == "volmae-classifier"
    facts = {
        "kind": "classifier" if classifier else "encoder",
        "model_name": checkpoint.get("model_name"),
        "parameters": int(sum(v.numel() for v in weights.values() if isinstance(v, torch.Tensor))),
        "input": {"grid": config.get("img_size") or checkpoint.get("input_size"), "patch_size": config.get("patch_size"),
                  "channels": config.get("in_chans", 1), "layout": LAYOUT,
                  "normalisation": {"input_mean": config.get("input_mean", 0.0), "input_std": config.get("input_std", 1.0),
                                    "note": "applied inside the model, after the [0, 1] intensity scaling"}},
        "preprocess": checkpoint.get("preprocess"),
        "storage_rounding": (checkpoint.get("data") or {}).get("stored_dtype"),
        "source_checkpoint": str(source),
    }
    if classifier:
        facts.update(task=checkpoint.get("task"), class_names=checkpoint.get("class_names"))
    if results:
        facts["scores"] = {split: {k: v for k, v in results[split].items() if k in SCORE_KEYS}
                           for split in ("val", "test") if isinstance(results.get(split), dict)}
        facts["floors"] = results.get("floors")
        facts["data_seen"] = {k: results[k] for k in ("rows", "excluded", "split_counts", "split_patients",
                                                      "train_samples_used", "train_patients_used") if k in results}
        facts["data_seen"]["label_counts"] = {
            "train": (results.get("data_profile") or {}).get("class_counts"),
            **{split: {name: c.get("support") for name, c in results[split].get("per_class", {}).items()}
               for split in ("val", "test") if isinstance(results.get(split), dict)}}
    else:
        facts["data_seen"] = {"pretraining data": checkpoint.get("data"), "epochs": checkpoint.get("epoch"),
                              "steps": checkpoint.get("step")}
    return facts


def _json(value) -> str:
    return f"```json\n{json.dumps(value, indent=2)}\n```"


def render_card(card: dict, formats: list[str]) -> str:
    """MODEL_CARD.md from the facts of config.json."""
    name = card["model_name"]
    kind = card["kind"]
    rounding = f", stored as {card['storage_rounding']} (rounded to its levels)" if card.get("storage_rounding") else ""
    lines = [f"# VolMAE {kind}: {name}", "",
             "## Model", "",
             f"- **What it is**: a {'fine-tuned classifier' if kind == 'classifier' else 'pretrained MAE encoder'} "
             f"`{name}`, {card['parameters']:,} parameters.",
             f"- **Files**: {', '.join(formats)}; `config.json` holds every fact below and the model's configuration.",
             f"- **Input**: {card['input']['channels']} channel(s) on a grid of {card['input']['grid']} voxels, patches of "
             f"{card['input']['patch_size']}. Layout {card['input']['layout']}.", ""]
    if kind == "classifier":
        lines += [f"- **Task**: {card.get('task')}; classes {card.get('class_names')}.", ""]
    lines += ["## Preprocessing", "",
              "Apply exactly this before the model (volmae-predict does, from config.json):", "",
              _json(card.get("preprocess")), "",
              f"Intensities are windowed to [0, 1]{rounding}, "
              f"then standardised inside the model with mean {card['input']['normalisation']['input_mean']:.4f} and "
              f"std {card['input']['normalisation']['input_std']:.4f}.", "",
              "## Training data", "", _json(card.get("data_seen")), ""]
    if card.get("scores"):
        lines += ["## Scores and floors", "",
                  "Scores of the exported weights on the run's own splits (split by patient; the test split read "
                  "once), beside the floors every VolMAE run reports: the majority share and PCA + logistic "
                  "regression on the downsampled voxels. A model is worth its cost only above them.", "",
                  _json({"scores": card["scores"], "floors": card.get("floors")}), ""]
    lines += ["## Intended use", "",
              "Research on 3D medical images: feature extraction, fine-tuning, and the prediction of the task above "
              "on volumes preprocessed as stated. Not a medical device; not validated for clinical decisions.", "",
              "## Known limits", "",
              "- Scores hold for data like the training data (scanner, protocol, population); check on your own "
              "validation split before trusting them elsewhere.",
              "- A volume preprocessed differently (orientation, spacing, window) is a different input: use "
              "volmae-predict or repeat the preprocessing above exactly.",
              "- Small validation and test splits give wide confidence intervals; read the CI, not the point score.",
              f"- Exported from `{card['source_checkpoint']}`.", ""]
    return "\n".join(lines)
