"""The `volumes` setup's data: a labels CSV of the user's own volumes as a fine-tuning task.

Each row names a volume (`path`: NIfTI, MHA/NRRD, a DICOM series folder, relative to the CSV) and its
label column(s). Every volume goes through the same reading and `PreprocessConfig` as `build_cache` and
`main_predict.py`, and is cached once in a VolMAE HDF5 cache (`volumes.build_cache`), so epochs, seeds
and later runs on the same CSV never decode it again. Splits come from a `split` column, or are drawn by
patient (`--group`): no patient is in two splits. A row whose volume cannot be read is reported by its
CSV line and reason, left out and counted; it never stops the run and never shrinks the data silently.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..util.atomic import atomic_write
from ..util.capped import print_capped
from ..util.metrics import REGRESSION
from ..volumes.build_cache import CacheSettingsError, build_cache, built_with
from ..volumes.cache import (
    DEFAULT_STORAGE_DTYPE,
    MANIFEST_FILE,
    META_FILE,
    CacheError,
    CacheReadError,
    VolumeCache,
    read_meta,
)
from ..volumes.preprocess import PreprocessConfig
from ..volumes.preprocess_choice import PreprocessChoice, choose_preprocess, survey_headers
from ..volumes.reading import VolumeReadError, listed_source, source_stamp
from .label_checks import (
    CSV_FIRST_ROW,
    duplicate_rows,
    missing_labels,
    refuse_case_variants,
    refuse_missing_classes,
    refuse_one_class,
    refuse_patients_in_two_splits,
    refuse_shared_files,
    strip_labels,
)
from .task_data import SPLITS, TaskData, TaskDataError, assign_splits, infer_task, label_arrays


@dataclass(frozen=True)
class VolumeTaskOptions:
    labels: list[str]
    requested_task: str = "auto"
    ratio: tuple[float, float, float] = (0.7, 0.15, 0.15)
    group: str = "pid"
    split_seed: int = 0
    label_case: str = "refuse"  # class names that differ only by case: "refuse", or "sensitive" (separate classes)
    folds: int = 0  # cross-validation pools train and val: a split column may then name no val rows
    preprocess: PreprocessConfig | None = None  # None: chosen from the headers (`--resample auto`)
    base: PreprocessConfig = field(default_factory=PreprocessConfig)  # windows and limits an automatic choice keeps
    input_size: tuple[int, int, int] | None = None  # the grid an automatic choice must use; None: chosen too
    workers: int = 1


def read_labels(csv: Path, options: VolumeTaskOptions) -> pd.DataFrame:
    """The labels CSV as strings, labels stripped, its paths absolute, with a `split` column: given, or drawn by
    patient and stratified by the first label (every class in every split, in about the ratio)."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise TaskDataError(f"{csv}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise TaskDataError(f"{csv}: not a readable CSV ({err})") from None
    if "path" not in table.columns or table.empty:
        raise TaskDataError(f"{csv}: needs a 'path' column and at least one row (columns: {', '.join(table.columns)})")
    if not options.labels:
        raise TaskDataError("--setup volumes needs --label (the label column or columns)")
    strip_labels(table, [*options.labels, options.group])
    if options.label_case != "sensitive":
        refuse_case_variants(table, options.labels, csv)
    table["split"] = assign_splits(table, options.ratio, options.split_seed, csv, options.group,
                                   label_strata(table, options.labels))
    table["path"] = [resolve_source(csv.parent, path) for path in table["path"]]
    return table


def label_strata(table: pd.DataFrame, labels: list[str]) -> pd.Series | None:
    """The first label of each row as the stratum of the split (rows without a label get their own), or None for
    a regression target, which has no classes to keep in proportion."""
    column = labels[0]
    if column not in table.columns:
        return None
    present = ~missing_labels(table, [column])
    if not present.any() or infer_task(table[present], [column], "auto") == REGRESSION:
        return None
    return table[column].where(present, "")


def resolve_source(base: Path, text: str) -> str:
    """A path relative to the CSV's folder made absolute (a DICOM series suffix `::UID` kept); empty stays empty."""
    return listed_source(base, text, canonical=True) if text.strip() else ""


def choose_for(sources: list[str], options: VolumeTaskOptions) -> PreprocessChoice:
    """The preprocessing given by the command line, or chosen from the headers of these sources."""
    if options.preprocess is not None:
        return PreprocessChoice(options.preprocess, "as given on the command line", {})
    try:
        survey = survey_headers(sources, options.base.max_voxels)
    except VolumeReadError as err:
        raise TaskDataError(f"cannot choose the preprocessing: {err}") from None
    return choose_preprocess(survey, options.base, options.input_size)


def finished_cache(sources: list[str], cache_dir: Path, config: PreprocessConfig) -> dict[str, dict] | None:
    """The manifest rows of a cache of these settings that already has a row for every source, else None."""
    if not (cache_dir / MANIFEST_FILE).exists() or not (cache_dir / META_FILE).exists():
        return None
    if not built_with(read_meta(cache_dir), config, DEFAULT_STORAGE_DTYPE):
        return None
    manifest = pd.read_csv(cache_dir / MANIFEST_FILE, keep_default_na=False, dtype={"stamp": str})
    rows = {row["source"]: row for row in manifest.to_dict("records")}
    if not all(source in rows for source in sources):
        return None
    if "stamp" in manifest.columns and any(rows[s]["stamp"] != source_stamp(s) for s in dict.fromkeys(sources)):
        return None  # a source changed since it was cached: build_cache caches it again
    return rows


def cache_volumes(sources: list[str], cache_dir: Path, config: PreprocessConfig, workers: int) -> dict[str, dict]:
    """Cache every distinct source (an existing cache of the same settings is reused and completed);
    source -> its manifest row. A cache that already holds every source is only read, so runs side by side
    share it without waiting for its build lock."""
    complete = finished_cache(sources, cache_dir, config)
    if complete is not None:
        return complete
    try:
        manifest = build_cache(list(dict.fromkeys(sources)), cache_dir, config, workers=workers)
    except CacheSettingsError as err:
        raise TaskDataError(f"{err}; give another --volume_cache") from None
    return {row["source"]: row for row in manifest.to_dict("records")}


def volume_task(csv: Path, options: VolumeTaskOptions, cache_dir: Path, output_dir: Path) -> TaskData:
    """The labelled volumes of `csv` as (N, 1, D, H, W) uint16 splits, with what prediction needs to repeat
    their preprocessing, and the rows that could not be used. OUTPUT_DIR/meta_split.csv is the CSV with absolute
    paths, the split of every row and whether it was used."""
    table = read_labels(csv, options)
    refuse_shared_files(table, options.group, csv)
    unlabelled = missing_labels(table, options.labels)
    excluded = [{"row": int(i) + CSV_FIRST_ROW, "path": table["path"].iloc[i],
                 "reason": f"no label in {', '.join(options.labels)}"} for i in np.flatnonzero(unlabelled)]
    duplicates = duplicate_rows(table[~unlabelled], options.labels, options.group, csv)
    excluded += duplicates
    repeated = table.index.isin([item["row"] - CSV_FIRST_ROW for item in duplicates])
    labelled = table[~unlabelled & ~repeated]
    if labelled.empty:
        raise TaskDataError(f"{csv}: no row has a label in {', '.join(options.labels)}")
    task = infer_task(labelled, options.labels, options.requested_task)
    targets, names = label_arrays(labelled, options.labels, task, csv)
    usable = [path for path in labelled["path"] if path]
    if not usable:
        raise TaskDataError(f"{csv}: every 'path' is empty")
    choice = choose_for(usable, options)
    print(f"preprocessing: {choice.reason}")
    rows = cache_volumes(usable, cache_dir, choice.config, options.workers)
    try:
        cache = VolumeCache(cache_dir)
    except CacheError as err:
        raise TaskDataError(str(err)) from None
    position = {source: i for i, source in enumerate(cache.manifest["source"])}
    keep, loaded = [], []
    for j, (i, path) in enumerate(zip(labelled.index, labelled["path"])):
        row = rows.get(path)
        if not path:
            reason = "empty path"
        elif row is None or row["status"] != "ok" or path not in position:
            reason = (row or {}).get("reason") or "not cached"
        else:
            try:
                loaded.append(cache.read_stored(position[path]))
                keep.append(j)
                continue
            except CacheReadError as err:  # a damaged cache costs this row, named, not the run
                reason = f"cached copy unreadable: {err}"
        excluded.append({"row": int(i) + CSV_FIRST_ROW, "path": path, "reason": reason})
    excluded.sort(key=lambda item: item["row"])
    if excluded:
        print_capped(f"warning: {len(excluded)} of {len(table)} rows of {csv} left out (no label, a duplicate, or a "
                     f"volume that cannot be read):", [f"line {item['row']} ({item['path']}): {item['reason']}" for item in excluded],
                     output_dir / "meta_split.csv")
    if not keep:
        raise TaskDataError(f"{csv}: none of the {len(table)} rows has a label and a readable volume")
    volumes = np.stack(loaded)
    kept = labelled.iloc[keep].reset_index(drop=True)
    targets = targets[keep]
    refuse_one_class(targets, task, names, csv)
    groups = kept[options.group].astype(str).to_numpy() if options.group in kept.columns else \
        kept["path"].to_numpy()
    splits, split_groups, sources = {}, {}, {}
    for split in SPLITS:
        chosen = (kept["split"] == split).to_numpy()
        splits[split] = (volumes[chosen], targets[chosen])
        split_groups[split] = groups[chosen]
        sources[split] = kept["path"].to_numpy()[chosen]
    empty = [s for s in ("train", "val") if not len(splits[s][0]) and not (s == "val" and options.folds)]
    if empty:
        raise TaskDataError(f"{csv}: the {' and '.join(empty)} split(s) would be empty; give more rows, another "
                            f"--split_ratio or a split column")
    refuse_patients_in_two_splits(split_groups, csv)
    refuse_one_class(splits["train"][1], task, names, csv, "row of the train split")
    refuse_missing_classes(splits, task, names, csv)
    config = choice.config
    data = {"source": "volumes", "meta": str(csv), "labels": list(options.labels), "group": options.group,
            "input_size": list(config.size), "in_chans": 1, "stored_dtype": str(cache.stored_dtype),
            "cache": str(cache_dir)}
    report = {"rows": len(table), "excluded_rows": excluded, "excluded": len(excluded),
              "duplicates_dropped": len(duplicates),
              "preprocess_choice": choice.to_dict(),
              "split_counts": {s: int(len(splits[s][0])) for s in SPLITS},
              "split_patients": {s: int(len(set(split_groups[s]))) for s in SPLITS}}
    output_dir.mkdir(parents=True, exist_ok=True)
    used = set(labelled.index[keep])
    reasons = {item["row"] - CSV_FIRST_ROW: item["reason"] for item in excluded}
    split_table = table.assign(status=["ok" if i in used else "excluded" for i in table.index],
                               excluded_reason=[reasons.get(i, "") for i in table.index])
    atomic_write(output_dir / "meta_split.csv", lambda tmp: split_table.to_csv(tmp, index=False))
    return TaskData(splits, task, names, tuple(config.size), 1, data, preprocess=config, groups=split_groups,
                    sources=sources, report=report)


def fraction_of_patients(groups: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the samples of a random `fraction` of the patients (at least one), drawn separately among
    patients with and without a positive first label, so that a small fraction still holds both classes."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a fraction of the training patients must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(len(groups))
    rng = np.random.default_rng(seed)
    first = labels.reshape(len(labels), -1)[:, 0]
    table = pd.DataFrame({"group": groups, "label": first})
    strata = table.groupby("group", sort=True)["label"].max()
    chosen = []
    for _, members in strata.groupby(strata):
        patients = members.index.to_numpy()
        count = max(1, int(round(fraction * len(patients))))
        chosen += list(rng.permutation(patients)[:count])
    return np.flatnonzero(np.isin(groups, chosen))
