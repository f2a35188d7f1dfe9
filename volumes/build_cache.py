"""Build the sharded HDF5 cache from a raw corpus, in parallel, resumably.

    volmae-cache --input /data/ct --output /cache/ct256 --size 256 --workers 8

Sources are split into shards once, in a plan kept in the output folder; each shard is built by
one worker into a temporary file that is renamed when complete, and its manifest rows are written
last. Re-running the same command after a crash or a kill builds only the shards not yet complete;
sources added to the input since are appended as new shards. Unusable inputs are `skipped` with
their reason; the exit code is non-zero only when nothing at all could be cached.
"""
import json
import math
import os
import queue
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import h5py
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from ..util.atomic import atomic_write, ensure_room, make_output_folder, remove_stale_temporaries
from ..util.errors import UsageError
from ..util.run_lock import output_folder_lock
from .cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    DEFAULT_STORAGE_DTYPE,
    MANIFEST_FILE,
    META_FILE,
    read_meta,
    write_volume,
)
from .preprocess import PreprocessConfig, preprocess_image
from .reading import VolumeReadError, read_image, source_stamp
from .sources import list_sources

PLAN_FILE = "plan.csv"
PARTS_DIR = ".parts"
MANIFEST_COLUMNS = ["index", "source", "status", "reason", "shard", "key", "modality", "original_size",
                    "original_spacing", "intensity_low", "intensity_high", "nonfinite_filled", "seconds", "stamp"]

_progress: "queue.Queue | None" = None  # set in each worker: one tick per finished volume


INTERRUPTED = 130  # the shell's exit status after Ctrl-C
HDF5_HEADROOM = 2**20  # bytes beyond a volume's raw size: its attributes, chunk index and the file's metadata


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.h5"


def volume_key(index: int) -> str:
    return f"vol{index:08d}"


def default_shard_size(count: int, workers: int, largest: int = 64) -> int:
    """Small enough that every worker gets several shards, at most `largest` volumes."""
    return max(1, min(largest, math.ceil(count / (4 * workers))))


def load_plan(root: Path, sources: list[str], shard_size: int, changed: tuple[str, ...] = ()) -> pd.DataFrame:
    """The source -> shard assignment: kept from an earlier run, new sources (and `changed` ones, again, under a
    new index) appended as new shards."""
    plan_path = root / PLAN_FILE
    plan = pd.read_csv(plan_path, keep_default_na=False) if plan_path.exists() else \
        pd.DataFrame({"index": pd.Series(dtype=int), "source": pd.Series(dtype=str), "shard": pd.Series(dtype=int)})
    known = set(plan["source"]) - set(changed)
    new = [s for s in dict.fromkeys(sources) if s not in known]
    if new:
        first_index = int(plan["index"].max()) + 1 if len(plan) else 0
        first_shard = int(plan["shard"].max()) + 1 if len(plan) else 0
        added = pd.DataFrame({"index": range(first_index, first_index + len(new)), "source": new,
                              "shard": [first_shard + i // shard_size for i in range(len(new))]})
        plan = pd.concat([plan, added], ignore_index=True)
        atomic_write(plan_path, lambda tmp: plan.to_csv(tmp, index=False))
    return plan


def same_output(a: PreprocessConfig, b: PreprocessConfig) -> bool:
    """Settings that change the cached arrays agree; the reading limits (max_voxels, external_data) may differ
    between runs."""
    reading = {"max_voxels": 0, "external_data": False}
    return {**a.to_dict(), **reading} == {**b.to_dict(), **reading}


def built_with(meta: dict, config: PreprocessConfig, dtype: str) -> bool:
    """Whether a cache.json describes a cache of these settings."""
    return meta["dtype"] == dtype and same_output(PreprocessConfig.from_dict(meta["preprocess"]), config)


class CacheSettingsError(UsageError):
    """The folder holds a cache of other preprocessing settings; the caller names the flag that picks another."""


def write_meta(root: Path, config: PreprocessConfig, dtype: str) -> None:
    """Create cache.json, or check that an existing cache was built with the same settings."""
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "dtype": dtype, "preprocess": config.to_dict()}
    path = root / META_FILE
    if path.exists():
        existing = read_meta(root)
        if not built_with(existing, config, dtype):
            raise CacheSettingsError(f"{root} holds a cache built with other settings "
                                     f"({json.dumps(existing['preprocess'])}, dtype {existing['dtype']})")
        return
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))


def _init_worker(progress: "queue.Queue", itk_threads: int) -> None:
    global _progress
    _progress = progress
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)


def _volume_attrs(image: sitk.Image, source: str, config: PreprocessConfig, result) -> dict:
    return {
        "source": source,
        "original_size": list(image.GetSize()),
        "original_spacing": list(image.GetSpacing()),
        "original_origin": list(image.GetOrigin()),
        "original_direction": list(image.GetDirection()),
        "modality": result.modality,
        "intensity_range": list(result.intensity_range),
        "preprocess": json.dumps(config.to_dict()),
    }


def build_shard(root: Path, shard: int, items: list[tuple[int, str]], config: PreprocessConfig,
                dtype: str) -> list[dict]:
    """Preprocess one shard's sources into shard-XXXXX.h5 (atomically), then record its manifest rows."""
    rows = []
    final = root / shard_name(shard)

    def write_shard(tmp: Path) -> None:
        with h5py.File(tmp, "w") as h5:
            group = h5.create_group("volumes")
            for index, source in items:
                rows.append(_build_volume(group, index, source, final.name, config, dtype))

    atomic_write(final, write_shard)
    if not any(row["status"] == "ok" for row in rows):
        final.unlink()
    part = root / PARTS_DIR / f"{final.stem}.csv"
    atomic_write(part, lambda tmp: pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(tmp, index=False))
    return rows  # the shard counts as done once its part is in place


def _build_volume(group: h5py.Group, index: int, source: str, shard: str, config: PreprocessConfig,
                  dtype: str) -> dict:
    """Read, preprocess and store one source; its manifest row says what happened."""
    start = time.perf_counter()
    row = {"index": index, "source": source, "status": "skipped", "reason": "", "shard": "", "key": "",
           "stamp": source_stamp(source)}  # before reading: a change during the read shows on the next run
    try:
        image = read_image(source, config.max_voxels, config.external_data)
        result = preprocess_image(image, config)
    except VolumeReadError as err:
        row["reason"] = str(err)
    except Exception as err:  # one bad input of thousands must not stop the build
        row["reason"] = f"{type(err).__name__}: {err}"
    else:  # outside the handlers above: a disk that refuses the shard stops the build, it loses no volume
        ensure_room(Path(group.file.filename).with_name(shard), result.array.nbytes + HDF5_HEADROOM)
        write_volume(group, volume_key(index), result.array, dtype, _volume_attrs(image, source, config, result))
        row.update(status="ok", shard=shard, key=volume_key(index), modality=result.modality,
                   original_size="x".join(map(str, image.GetSize())),
                   original_spacing="x".join(f"{s:.4g}" for s in image.GetSpacing()),
                   intensity_low=result.intensity_range[0], intensity_high=result.intensity_range[1],
                   nonfinite_filled=result.nonfinite_filled)
    row["seconds"] = round(time.perf_counter() - start, 3)
    if _progress is not None:
        _progress.put(row["status"])
    return row


def clean_temporaries(root: Path) -> None:
    """Leftovers of a killed run: never complete, never read."""
    remove_stale_temporaries(root)
    remove_stale_temporaries(root / PARTS_DIR)


def cached_rows(root: Path) -> pd.DataFrame:
    """Every finished shard's rows; a source cached again has several, the newest (highest index) counts."""
    parts = [pd.read_csv(p, keep_default_na=False, dtype={"stamp": str}) for p in sorted((root / PARTS_DIR).glob("shard-*.csv"))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=MANIFEST_COLUMNS)


def changed_sources(root: Path, sources: list[str]) -> list[str]:
    """Sources of this build whose stamp (reading.source_stamp) differs from the one recorded when they were
    cached: replaced at the same path, or missing then and present now. Caches built before stamps were
    recorded are not second-guessed."""
    rows = cached_rows(root)
    if rows.empty or "stamp" not in rows.columns:
        return []
    newest = rows.sort_values("index")
    recorded = dict(zip(newest["source"], newest["stamp"]))
    return [s for s in dict.fromkeys(sources) if s in recorded and recorded[s] != source_stamp(s)]


def write_manifest(root: Path, plan: pd.DataFrame) -> pd.DataFrame:
    """One row per source, its newest build; `recached` says which were built again because they changed."""
    rows = cached_rows(root)
    rows = rows[rows["index"].isin(plan["index"])].sort_values("index")
    builds = rows.groupby("source")["index"].transform("size")
    manifest = rows.assign(recached=builds > 1).drop_duplicates("source", keep="last")
    atomic_write(root / MANIFEST_FILE, lambda tmp: manifest.to_csv(tmp, index=False))
    return manifest


def build_cache(input_path: str | list[str], output: str | os.PathLike, config: PreprocessConfig, workers: int = 1,
                dtype: str = DEFAULT_STORAGE_DTYPE, shard_size: int | None = None, progress: bool = True,
                itk_threads: int | None = None) -> pd.DataFrame:
    """Build (or finish) the cache of a corpus location or of a list of sources; returns the manifest.
    ITK threads per worker default to cores / workers. One build at a time per cache folder (util.run_lock)."""
    root = Path(output)
    make_output_folder(root / PARTS_DIR)
    with output_folder_lock(root):
        return _build_locked(input_path, root, config, workers, dtype, shard_size, progress, itk_threads)


def _build_locked(input_path: str | list[str], root: Path, config: PreprocessConfig, workers: int, dtype: str,
                  shard_size: int | None, progress: bool, itk_threads: int | None) -> pd.DataFrame:
    sources = list(input_path) if isinstance(input_path, list) else list_sources(input_path)
    write_meta(root, config, dtype)
    clean_temporaries(root)
    changed = changed_sources(root, sources)
    if changed and progress:
        print(f"{len(changed)} source(s) changed since they were cached (size, modification time, or now present): "
              f"caching them again, e.g. {changed[0]}")
    plan = load_plan(root, sources, shard_size or default_shard_size(len(sources), workers), tuple(changed))
    done = {int(p.stem.split("-")[1]) for p in (root / PARTS_DIR).glob("shard-*.csv")}
    todo = {shard: list(zip(group["index"], group["source"]))
            for shard, group in plan.groupby("shard") if shard not in done}
    pending = sum(len(items) for items in todo.values())
    if progress and len(plan) > pending:
        print(f"{len(plan) - pending} of {len(plan)} sources already done; building {pending}")
    itk_threads = itk_threads or max(1, (os.cpu_count() or 1) // workers)
    with tqdm(total=pending, desc="caching", unit="vol", disable=not progress) as bar:
        if workers == 1:
            ticks = queue.Queue()
            _init_worker(ticks, itk_threads)
            for shard, items in todo.items():
                build_shard(root, shard, items, config, dtype)
                _drain(ticks, bar)
        else:
            _build_in_pool(root, todo, config, dtype, workers, itk_threads, bar)
    return write_manifest(root, plan)


def _build_in_pool(root: Path, todo: dict, config: PreprocessConfig, dtype: str, workers: int,
                   itk_threads: int, bar: tqdm) -> None:
    """Spawned workers (no fork: ITK's thread pools do not survive one), one shard per task."""
    context = get_context("spawn")
    ticks = context.Queue()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(ticks, itk_threads)) as pool:
        futures = _submit_deaf_to_ctrl_c(pool, [(build_shard, root, shard, items, config, dtype)
                                                for shard, items in todo.items()])
        try:
            while not all(f.done() for f in futures):
                _drain(ticks, bar, timeout=0.2)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)  # shards in progress finish or leave a temporary
            raise
        _drain(ticks, bar)
        for future in futures:
            future.result()  # re-raises a worker's crash; the next run resumes from the done shards


def _submit_deaf_to_ctrl_c(pool: ProcessPoolExecutor, tasks: list[tuple]) -> list:
    """Submit with SIGINT ignored, so that the workers these submits spawn are born ignoring it.

    Ctrl-C is the parent's to handle: it keeps the finished shards and says so in one line. A handler set
    in the worker's initializer comes too late: a worker still importing torch would print a traceback.
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return [pool.submit(*task) for task in tasks]
    finally:
        signal.signal(signal.SIGINT, previous)


def _drain(ticks: "queue.Queue", bar: tqdm, timeout: float = 0.0) -> None:
    """Advance the bar by the volumes finished so far (waiting up to `timeout` for the first)."""
    try:
        ticks.get(timeout=timeout) if timeout else ticks.get_nowait()
        bar.update(1)
        while True:
            ticks.get_nowait()
            bar.update(1)
    except queue.Empty:
        pass


def summarise(manifest: pd.DataFrame, output: Path, seconds: float) -> str:
    ok = int((manifest["status"] == "ok").sum())
    skipped = manifest[manifest["status"] == "skipped"]
    lines = [f"cached {ok} of {len(manifest)} volumes in {output} ({seconds:.1f} s); manifest: {output / MANIFEST_FILE}"]
    if len(skipped):
        lines.append(f"skipped {len(skipped)}:")
        lines += [f"  {row.source}: {row.reason}" for row in skipped.itertuples()]
        if skipped["reason"].str.contains("non-finite voxels").any():
            lines.append("  (--nonfinite fill caches such volumes with their NaN/Inf voxels set to the background value)")
    filled = manifest[pd.to_numeric(manifest["nonfinite_filled"], errors="coerce").fillna(0) > 0] \
        if "nonfinite_filled" in manifest.columns else manifest.iloc[:0]
    if len(filled):
        lines.append(f"warning: NaN/Inf voxels replaced by the background value (--nonfinite fill) in {len(filled)}:")
        lines += [f"  {row.source}: {int(float(row.nonfinite_filled))} voxels" for row in filled.itertuples()]
    return "\n".join(lines)
