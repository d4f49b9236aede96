"""medtl pull (DICOMweb) against a bare dicomweb-client retrieval of the same studies, and the incremental
pull after +5 % studies. A real local Orthanc (pipeline/sources/orthanc.py) on loopback.

Usage: python benchmarks/bench_pull.py [--patients 60] [--workdir benchmarks/out]

  * bare: QIDO-RS the series of every study, then ``retrieve_series`` of each with dicomweb-client, the
    datasets kept in memory (no files): the floor of retrieving these instances over this server;
  * pull: ``pacs.pull`` from an empty folder and cursor (queries, retrieval, atomic file writes, cursor);
  * incremental: ~5 % new patients' studies stored, then ``pacs.pull`` again on the same folder and cursor.
The bare retrieval and the full pull run twice in alternating order; the better of each is reported.
Prints a markdown table and writes benchmarks/out/pull.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import synth  # noqa: E402
from pipeline.sources import orthanc, pacs  # noqa: E402


def bare(client: pacs.DicomwebClient) -> int:
    n = 0
    for study in client.studies():
        for series in client.series(study.uid):
            n += len(client.client.retrieve_series(study.uid, series.uid, media_types=(("application/dicom", "*"),)))
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    why = orthanc.missing()
    if why:
        raise SystemExit(f"bench_pull: {why}")
    work = args.workdir / "pull"
    shutil.rmtree(work, ignore_errors=True)
    cohort = work / "cohort"
    synth.run(synth.SynthParams(patients=args.patients, seed=9, defects=False), cohort)
    server = orthanc.start(work / "orthanc")
    try:
        start = time.perf_counter()
        stored = orthanc.load(server, cohort)
        load_s = time.perf_counter() - start
        params = pacs.PacsParams(url=server.dicomweb_url, modalities=())
        client = pacs.DicomwebClient(params, pacs.Credentials(username=server.user, password=server.password))
        times = {"bare": [], "pull": []}
        for order in (("pull", "bare"), ("bare", "pull")):  # alternating; the last leaves a full pull for the increment
            for what in order:
                shutil.rmtree(work / "raw", ignore_errors=True)
                (work / "cursor.json").unlink(missing_ok=True)
                start = time.perf_counter()
                n = bare(client) if what == "bare" else pacs.pull("dicomweb", params, work / "raw", work / "cursor.json",
                                                                  client=client).instances_retrieved
                times[what].append(time.perf_counter() - start)
                assert n == stored, (what, n, stored)
        before = {p for p in (cohort / "DICOM").rglob("*") if p.is_file()}
        studies_before = len(client.studies())
        added_patients = max(1, round(args.patients * 0.05 * 0.98))  # ~1.8 studies per patient: ~+5 % studies
        synth.add(cohort, added_patients)
        new = work / "new"
        for path in (cohort / "DICOM").rglob("*"):
            if path.is_file() and path not in before:
                target = new / path.relative_to(cohort)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
        added = orthanc.load(server, new)
        start = time.perf_counter()
        inc = pacs.pull("dicomweb", params, work / "raw", work / "cursor.json", client=client)
        inc_s = time.perf_counter() - start
        assert inc.instances_retrieved == added, (inc.instances_retrieved, added)
    finally:
        server.stop()
    best_bare, best_pull = min(times["bare"]), min(times["pull"])
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "cohort": {"patients": args.patients, "instances": stored, "load_s_stow": round(load_s, 2)},
        "bare_s": [round(t, 3) for t in times["bare"]], "pull_s": [round(t, 3) for t in times["pull"]],
        "bare_instances_per_s": round(stored / best_bare, 1), "pull_instances_per_s": round(stored / best_pull, 1),
        "ratio_pull_to_bare": round(best_bare / best_pull, 3),
        "incremental": {"patients_added": added_patients, "studies_new": inc.studies_new,
                        "share_of_studies": round(inc.studies_new / studies_before, 3), "instances": added,
                        "share_of_instances": round(added / stored, 3), "seconds": round(inc_s, 3),
                        "share_of_full_pull": round(inc_s / best_pull, 3)},
    }
    (args.workdir / "pull.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    i = results["incremental"]
    print(f"\n| measure | value |\n|---|---|\n| bare dicomweb-client retrieval | {results['bare_instances_per_s']} instances/s |"
          f"\n| medtl pull | {results['pull_instances_per_s']} instances/s = **{results['ratio_pull_to_bare']}** of bare |"
          f"\n| incremental pull after +{i['studies_new']} studies ({100 * i['share_of_studies']:.1f} %; "
          f"{i['instances']} instances, {100 * i['share_of_instances']:.1f} %) | {i['seconds']} s = **{100 * i['share_of_full_pull']:.1f} %** of a full pull |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
