"""Reading, preprocessing and caching volumes; MedMNIST, meta-CSV and prediction inputs; augmentation."""
