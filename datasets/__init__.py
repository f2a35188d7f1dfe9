"""Reading, preprocessing and serving volumes (and, later, the HDF5 cache and MedMNIST)."""
