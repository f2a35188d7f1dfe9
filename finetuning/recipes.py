"""Optimisation recipes: defaults for the flags left unset (docs/finetuning.md says why each value is what it is)."""

# Layer-wise lr decay only makes sense for pretrained layers; a model trained from scratch gets one lr.
PRETRAINED_LAYER_DECAY = 0.75

RECIPES = {
    # MAE fine-tuning (facebookresearch/mae), re-tuned on AdrenalMNIST3D and BreastMNIST (docs/finetuning.md):
    # AdamW, layer-wise lr decay when pretrained (None: 0.75 with --finetune, 1.0 without), warmup + cosine
    "mae": {"optimizer": "adamw", "schedule": "cosine", "blr": 2.4e-3, "lr": None, "layer_decay": None,
            "weight_decay": 0.05, "warmup_epochs": 5, "smoothing": 0.0, "drop_path": 0.1, "augment": "auto",
            "batch_size": 32, "epochs": 30},
    # The official MedMNIST baselines: Adam 1e-3, x0.1 at 50% and 75% of 100 epochs, batch 32, no augmentation
    "medmnist": {"optimizer": "adam", "schedule": "multistep", "blr": None, "lr": 1e-3, "layer_decay": 1.0,
                 "weight_decay": 0.0, "warmup_epochs": 0, "smoothing": 0.0, "drop_path": 0.0, "augment": "none",
                 "batch_size": 32, "epochs": 100},
    # 3DViTMedNet: Adam 1e-5, batch 6, 100 epochs, its augmentation pipeline
    "vitmednet": {"optimizer": "adam", "schedule": "constant", "blr": None, "lr": 1e-5, "layer_decay": 1.0,
                  "weight_decay": 0.0, "warmup_epochs": 0, "smoothing": 0.0, "drop_path": 0.0, "augment": "auto",
                  "batch_size": 6, "epochs": 100},
    # SLIViT: Adam 5e-5, batch 4, early stopping on validation loss with patience 5
    "slivit": {"optimizer": "adam", "schedule": "constant", "blr": None, "lr": 5e-5, "layer_decay": 1.0,
               "weight_decay": 0.0, "warmup_epochs": 0, "smoothing": 0.0, "drop_path": 0.0, "augment": "none",
               "batch_size": 4, "epochs": 100, "patience": 5},
}
