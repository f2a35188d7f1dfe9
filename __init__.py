"""VolMAE: self-supervised pretraining and classification of 3D medical images (see README.md)."""
