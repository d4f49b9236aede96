"""medtl predict: one study end to end (DICOM in -> results and SR out) and batch throughput.

Usage: python benchmarks/bench_predict.py [--patients 30] [--studies 20] [--workdir benchmarks/out]

Model: the default backbone (EfficientNet-Lite0, ImageNet weights from the package) with a 2-class head,
the demo's preprocess (160 px, 3 channels): latency does not depend on what the head learned.
  * latency: each of ``--studies`` studies alone in its own input folder, through ``predict.run`` with
    fresh work and output folders (ingest, de-identification, preprocess, scoring, SR), the model loaded
    once per process (the first call, which loads it, is reported apart); p50 and p95;
  * throughput: every study of the cohort in one run; images/s end to end, and the scoring step's
    images/s against evaluate's inference on the same tensors (the same ``inference.score_split``,
    timed through evaluate's own call).
Prints a markdown table and writes benchmarks/out/predict.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import ingest, models, predict, synth  # noqa: E402
from pipeline.data import SplitData  # noqa: E402
from pipeline.inference import score_split  # noqa: E402

KEY = b"benchmark-key-not-secret-0123456789"
PREPROCESS = {"size": 160, "channels": 3, "window": {"CT": "lung", "default": "percentile"}, "workers": 0}


def _model(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, _ = models.build_model(models.ModelParams(), num_classes=2)
    spec = {"shape": [3, 160, 160], "preprocess": PREPROCESS, "classes": ["normal", "lesion"]}
    buffer = io.BytesIO()
    torch.save(models.save_model(model, "efficientnet-lite0", ["normal", "lesion"], spec), buffer)
    (out / "model.pt").write_bytes(buffer.getvalue())
    (out / "model_card.json").write_text(json.dumps({
        "name": "bench", "model_file": {"path": "model.pt", "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()},
        "input_spec": spec}))
    (out / "metrics.json").write_text(json.dumps({"threshold": {"method": "youden", "value": 0.5, "chosen_on": "val"}}))
    return out / "model.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    work = args.workdir / "predict"
    shutil.rmtree(work, ignore_errors=True)
    cohort = work / "cohort"
    synth.run(synth.SynthParams(patients=args.patients, seed=5), cohort)
    model_path = _model(work / "model")
    params = predict.PredictParams(device="cpu")
    ingest_params = ingest.IngestParams(workers=1)  # one study: the pool would cost more than it saves

    studies = sorted(p for p in (cohort / "DICOM").glob("*/*/*") if p.is_dir())  # DICOM/<site>/<patient>/<study>
    single = []
    for i, study in enumerate(studies[:args.studies + 1]):
        case = work / f"case{i:03d}"
        shutil.copytree(study, case / "in" / study.name)
        start = time.perf_counter()
        summary = predict.run(params, case / "in", case / "out", model_path=model_path, work_dir=case / "work",
                              local_dir=case / "local", key=KEY, ingest_params=ingest_params)
        single.append({"seconds": time.perf_counter() - start, "images": summary["counts"]["images"],
                       "files": summary["counts"]["files_seen"], "studies": summary["counts"]["studies"]})
        shutil.rmtree(case)
    first, rest = single[0], single[1:]
    latency = np.array([r["seconds"] for r in rest])

    start = time.perf_counter()
    batch = predict.run(params, cohort / "DICOM", work / "batch" / "out", model_path=model_path,
                        work_dir=work / "batch" / "work", local_dir=work / "batch" / "local", key=KEY,
                        ingest_params=ingest.IngestParams(workers=0))
    batch_s = time.perf_counter() - start

    # the scoring step alone, as predict does it and as evaluate does it (evaluate.run -> score_split)
    images_dir = work / "batch" / "work" / "images"
    index = pd.read_parquet(images_dir / "index.parquet")
    rows = index["row"].to_numpy()
    data = SplitData(images_dir / "tensors.npy", {"test": rows}, {"test": np.zeros(len(rows), np.int64)},
                     {"test": index["modality"].astype(str).to_numpy()}, {"test": 1}, (3, 160, 160))
    net, _ = models.load_model(model_path)
    rates = {}
    for name, batch_size in (("predict", params.batch_size), ("evaluate", 32)):
        start = time.perf_counter()
        score_split(net, data, "test", torch.device("cpu"), batch_size)
        rates[name] = len(rows) / (time.perf_counter() - start)

    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "latency_one_study": {"studies": len(rest), "p50_s": round(float(np.percentile(latency, 50)), 3),
                              "p95_s": round(float(np.percentile(latency, 95)), 3),
                              "mean_images_per_study": round(float(np.mean([r["images"] for r in rest])), 1),
                              "mean_files_per_study": round(float(np.mean([r["files"] for r in rest])), 1),
                              "first_call_s_incl_model_load": round(first["seconds"], 3)},
        "batch": {"studies": batch["counts"]["studies"], "images": batch["counts"]["images"],
                  "files": batch["counts"]["files_seen"], "seconds": round(batch_s, 2),
                  "images_per_s_end_to_end": round(batch["counts"]["images"] / batch_s, 2),
                  "scoring_images_per_s_predict": round(rates["predict"], 1),
                  "scoring_images_per_s_evaluate": round(rates["evaluate"], 1),
                  "ratio_predict_to_evaluate": round(rates["predict"] / rates["evaluate"], 3)},
    }
    (args.workdir / "predict.json").write_text(json.dumps(results, indent=2) + "\n")
    lat, b = results["latency_one_study"], results["batch"]
    print(json.dumps(results, indent=2))
    print(f"\n| measure | value |\n|---|---|\n| one study, p50 | {lat['p50_s']} s |\n| one study, p95 | {lat['p95_s']} s |"
          f"\n| first call (model load) | {lat['first_call_s_incl_model_load']} s |"
          f"\n| batch end to end | {b['images_per_s_end_to_end']} images/s ({b['images']} images, {b['seconds']} s) |"
          f"\n| scoring, predict / evaluate | {b['scoring_images_per_s_predict']} / {b['scoring_images_per_s_evaluate']} "
          f"images/s = {b['ratio_predict_to_evaluate']} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
