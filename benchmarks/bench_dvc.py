"""DVC cost of the preprocessed outputs of >= 5,000 images: add, status, no-change repro, push.

Usage: python benchmarks/bench_dvc.py [--images 5000] [--source benchmarks/out/preprocess_w2] [--workdir benchmarks/out]

Builds a scratch git+DVC repo whose `preprocess` stage output is a tensor file of `--images` rows
(real preprocessed images from --source, made by bench_preprocess.py, repeated to reach the count)
plus its index, then times, in that repo: `dvc repro` of the stage (hashing + caching the outputs),
`dvc status` and `dvc repro` with nothing changed, and `dvc push` to a local directory remote.
Prints a markdown table and writes benchmarks/out/dvc.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _dvc(repo: Path, *args: str) -> float:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"dvc {' '.join(args)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--source", type=Path, default=Path("benchmarks/out/preprocess_w2"))
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    source = np.load(args.source / "tensors.npy", mmap_mode="r")
    index = pd.read_parquet(args.source / "index.parquet")
    repo = (args.workdir / "dvc_repo").resolve()
    remote = (args.workdir / "dvc_remote").resolve()
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(remote, ignore_errors=True)
    (repo / "source").mkdir(parents=True)
    # the stage's input: the real tensors, repeated to the wanted count (DVC cost depends on bytes and files)
    reps = -(-args.images // len(source))
    out = np.lib.format.open_memmap(repo / "source" / "tensors.npy", mode="w+", dtype=source.dtype,
                                    shape=(args.images, *source.shape[1:]))
    for start in range(0, args.images, len(source)):
        stop = min(args.images, start + len(source))
        out[start:stop] = source[: stop - start]
    out.flush()
    del out
    big = pd.concat([index.assign(image_id=index["image_id"] + f"-{k}") for k in range(reps)]).head(args.images)
    big.assign(row=np.arange(len(big))).to_parquet(repo / "source" / "index.parquet")
    size_gb = (repo / "source" / "tensors.npy").stat().st_size / 1e9
    (repo / "dvc.yaml").write_text(
        "stages:\n  preprocess:\n    cmd: mkdir -p processed && cp source/tensors.npy source/index.parquet processed/\n"
        "    deps: [source]\n    outs: [processed/tensors.npy, processed/index.parquet]\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    _dvc(repo, "remote", "add", "-d", "local", str(remote))
    results = {"images": args.images, "tensor_gb": round(size_gb, 2), "shape": list(np.load(
        repo / "source" / "tensors.npy", mmap_mode="r").shape)}
    results["repro_first_s"] = round(_dvc(repo, "repro"), 2)
    results["status_no_change_s"] = round(_dvc(repo, "status"), 2)
    results["repro_no_change_s"] = round(_dvc(repo, "repro"), 2)
    results["push_s"] = round(_dvc(repo, "push"), 2)
    results["push_again_s"] = round(_dvc(repo, "push"), 2)
    (args.workdir / "dvc.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    print("\n| images | tensor file | first repro | status, no change | repro, no change | push | push again |\n"
          "|---|---|---|---|---|---|---|")
    r = results
    print(f"| {r['images']} | {r['tensor_gb']} GB | {r['repro_first_s']} s | {r['status_no_change_s']} s | "
          f"{r['repro_no_change_s']} s | {r['push_s']} s | {r['push_again_s']} s |")
    shutil.rmtree(repo)
    shutil.rmtree(remote)


if __name__ == "__main__":
    main()
