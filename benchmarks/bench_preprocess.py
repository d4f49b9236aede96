"""Preprocess throughput against the floor of bare decoding (``pixel_array``) of the same instances.

Usage: python benchmarks/bench_preprocess.py [--ingest benchmarks/out/ingest_w2] [--workdir benchmarks/out]

Reads an ingest output (by default the one ``bench_ingest.py`` leaves behind), then measures in one run:
  * floor: ``pydicom.dcmread(f).pixel_array`` of every file of every image unit, 1 and 2 processes;
  * preprocess (physical units, orientation/resampling, VOI, resize, writing the tensor file),
    1 and 2 workers, with the default params.
Prints a markdown table and writes benchmarks/out/preprocess.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import timed_map  # noqa: E402 - benchmarks/ is on sys.path when run as a script
from pipeline import preprocess  # noqa: E402


def _decode(paths: list[str]) -> int:
    return sum(pydicom.dcmread(p).pixel_array.size for p in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest", type=Path, default=Path("benchmarks/out/ingest_w2"))
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    if not (args.ingest / "manifest.parquet").exists():
        sys.exit(f"{args.ingest}: no manifest.parquet; run benchmarks/bench_ingest.py first")
    manifest = pd.read_parquet(args.ingest / "manifest.parquet")
    units = [[str(args.ingest / p) for p in paths] for paths in manifest["paths"]]
    n_images, n_files = len(units), sum(len(u) for u in units)
    print(f"{n_images} images ({n_files} files): {manifest['unit'].value_counts().to_dict()}")
    results: dict = {"images": n_images, "files": n_files, "params": "defaults (224 px, 3 ch, key slice, 1.5x1.5x2.5 mm)"}
    for workers in (1, 2):
        t_floor = timed_map(_decode, units, workers, chunksize=4)
        out = args.workdir / f"preprocess_w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        summary = preprocess.run(preprocess.PreprocessParams(workers=workers), args.ingest, out)
        t_pre = time.perf_counter() - start
        results[f"workers_{workers}"] = {
            "floor_s": round(t_floor, 2), "floor_images_per_s": round(n_images / t_floor, 1),
            "preprocess_s": round(t_pre, 2), "preprocess_images_per_s": round(n_images / t_pre, 1),
            "ratio_preprocess_to_floor": round(t_pre / t_floor, 2), "rejected": summary.rejected,
        }
        print(json.dumps({f"workers_{workers}": results[f"workers_{workers}"]}))
    (args.workdir / "preprocess.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| workers | decode floor images/s | preprocess images/s | preprocess / floor time |\n|---|---|---|---|")
    for w in (1, 2):
        r = results[f"workers_{w}"]
        print(f"| {w} | {r['floor_images_per_s']} | {r['preprocess_images_per_s']} | {r['ratio_preprocess_to_floor']}× |")


if __name__ == "__main__":
    main()
