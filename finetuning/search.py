"""Settings the data decides, chosen without the test split: a few candidate (lr, augmentation) pairs.

One default cannot serve every dataset: on a set whose images sit at the class prior under the recipe's lr and full
augmentation, a higher lr with flips may learn. So the flags a user leaves unset become candidates, trained on the
training patients and judged on validation only (with --folds, on the pooled out-of-fold predictions):
  - fallback (the default for users' volumes): the recipe's values first; the next candidate only when a model
    collapses, sits at the class prior, or scores below the PCA + logistic regression floor on validation, so a
    dataset the recipe serves pays for one run;
  - full: every candidate, the best validation score kept.
The test split is read once, by the chosen model; results.json lists every candidate with its validation scores.
"""
import math
from dataclasses import asdict, dataclass

from .finetune_config import FinetuneRun

SEARCH_MODES = ("none", "fallback", "full")
LR_FACTORS = (1.0, 4.0)  # the recipe's lr, and one high enough to leave the prior where the recipe's is too low
FALLBACK_AUGMENT = "flips"  # the lightest augmentation that still regularises


@dataclass(frozen=True)
class Candidate:
    lr: float
    augment: str

    @property
    def name(self) -> str:
        return f"lr{self.lr:.2e}_{self.augment}"

    def apply(self, run: FinetuneRun) -> FinetuneRun:
        return run.with_candidate(self.lr, self.augment)


def candidates(run: FinetuneRun, chosen_augment: str) -> list[Candidate]:
    """The recipe's (lr, augmentation) first, then the most different pair, then the rest, at most
    --search_budget; a flag the user set is not searched."""
    lr = run.training.lr
    if run.search == "none":
        return [Candidate(lr, chosen_augment)]
    lrs = [lr] if {"lr", "blr"} & set(run.given) or lr == 0 else [lr * f for f in LR_FACTORS]
    augments = [chosen_augment] if "augment" in run.given else list(dict.fromkeys([chosen_augment, FALLBACK_AUGMENT]))
    pairs = [(lrs[0], augments[0]), (lrs[-1], augments[-1])]
    pairs += [(lr, augment) for lr in lrs for augment in augments]
    unique = list(dict.fromkeys(Candidate(lr, augment) for lr, augment in pairs))
    return unique[:run.search_budget]


def clears_validation(record: dict) -> bool:
    """Left the class prior and reached the PCA + logistic regression floor on validation (where there is one)."""
    floor = record.get("val_floor_auc")
    score = record["val_score"]
    above = floor is None or not math.isfinite(floor) or (math.isfinite(score) and score >= floor)
    return not record["collapsed"] and not record["val_at_prior"] and above


def rank_key(record: dict) -> tuple:
    """Clearing validation first, then having left the class prior (a model at the prior is never preferred to one
    that left it, whatever its AUC from tiny score differences), then the validation score (an undefined one last)."""
    score = record["val_score"]
    left_prior = not record["collapsed"] and not record["val_at_prior"]
    return clears_validation(record), left_prior, score if math.isfinite(score) else -math.inf


def candidate_record(candidate: Candidate, selection: dict, val_floor_auc: float | None) -> dict:
    """What a trained candidate is judged by: its best epoch's validation score (AUC, R2 for regression) and
    whether that epoch sat at the class prior, as finetuning.engine.Finetuner.fit chose it."""
    score = next(value for key, value in selection.items() if key in ("best_val_auc", "best_val_r2"))
    return {"name": candidate.name, **asdict(candidate), "best_epoch": selection["best_epoch"],
            "epochs_run": selection["epochs_run"],
            "collapsed": selection["collapsed"], "val_score": score, "val_at_prior": selection["best_val_at_prior"],
            "val_floor_auc": val_floor_auc}
