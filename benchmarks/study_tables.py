"""The tables the docs quote from a volumes study's results.json: per fraction, each arm's final model beside the
floors (out of fold and on test), the paired MAE - scratch difference with its two-level interval and its
per-fold differences, the candidates, and the cost. Markdown on stdout, so that no figure is copied by hand.

    python benchmarks/study_tables.py benchmarks/results/recipe_lidc_cv_cpu.json
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import sys
from pathlib import Path

from ..util.cli import run_main


def number(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def tables(result: dict) -> list[str]:
    lines = ["| training patients | MAE out of fold | MAE test | scratch out of fold | scratch test | "
             "MAE - scratch test, two-level 95% CI | per fold | PCA floor (oof / test) | one-column floor (oof / test) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(result["fractions"], key=float):
        entry = result["fractions"][key]
        paired = entry.get("paired") or {}
        ci = paired.get("ci95") or [None, None]
        floor, pca = entry.get("floor") or {}, entry.get("pca_floor") or {}
        marks = {init: " (below the PCA floor out of fold)" if entry[init]["below_floor"] else ""
                 for init in ("mae", "scratch") if init in entry}
        lines.append(
            f"| {entry['train_patients']} ({key}) | {number(entry['mae']['oof_auc'])}{marks['mae']} | "
            f"{number(entry['mae']['test_auc_mean'])} | "
            f"{number(entry['scratch']['oof_auc']) + marks['scratch'] if 'scratch' in entry else 'n/a'} | "
            f"{number(entry['scratch']['test_auc_mean']) if 'scratch' in entry else 'n/a'} | "
            f"{number(paired.get('difference'), True)} [{number(ci[0], True)}, {number(ci[1], True)}] | "
            f"{', '.join(number(d, True) for d in paired.get('per_unit_difference', []))} | "
            f"{number(pca.get('val_auc'))} / {number(pca.get('test_auc_mean'))} | "
            f"{number(floor.get('val_auc'))} / {number(floor.get('test_auc_mean'))} |")
    lines += ["", "| fraction | arm | candidates (pooled out-of-fold AUC) | chosen | stack with the PCA floor (oof / test) |",
              "|---|---|---|---|---|"]
    for key in sorted(result["fractions"], key=float):
        for init in ("mae", "scratch"):
            arm = result["fractions"][key].get(init)
            if not arm:
                continue
            candidates = ", ".join(f"{name} {number(score)}" for name, score in arm["candidates"][0].items())
            stack = (arm.get("stack_screen") or [None])[0] or {}
            lines.append(f"| {key} | {init} | {candidates} | {arm['chosen'][0]} | "
                         f"{number(stack.get('val_auc'))} / {number(stack.get('test_auc'))} |")
    lines += ["", f"Cost: {result['cpu_seconds'] / 3600:.2f} CPU-hours in all, the MAE arm "
                  f"{result['cpu_seconds_mae_arm'] / 3600:.2f} (pretraining {result['pretrain']['cpu_seconds_per_seed']:.0f} "
                  f"CPU seconds). Below the floor out of fold: {', '.join(result['below_floor']) or 'none'}."]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a volumes study's results.json")
    print("\n".join(tables(json.loads(parser.parse_args().results.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
