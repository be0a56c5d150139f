"""The digits data set, its metrics and the training of the shipped digits model (the model itself, and
loading it, live in `probflow.models.digits`).

`data`: the fixed split of scikit-learn's 8×8 digits. `metrics`: Fréchet distance and the digits
classifier. `train`: DDPM training and the checkpoint writer behind `probflow train digits`.
"""

from probflow.digits.data import SPLIT_SEED, TEST_FRACTION, load_split
from probflow.digits.metrics import confidence, evaluate, fit_classifier, frechet_distance, gaussian_fit

__all__ = ["SPLIT_SEED", "TEST_FRACTION", "load_split", "gaussian_fit", "frechet_distance", "fit_classifier",
           "confidence", "evaluate"]
