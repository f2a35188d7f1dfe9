"""The `scripts/` package a MONAI bundle exported by VolMAE carries (inference.monai_bundle copies these files):
the network, the preprocessing as a MONAI transform, and the writer of the outputs. They import torch, numpy,
SimpleITK and MONAI only: a bundle runs where VolMAE is not installed."""
