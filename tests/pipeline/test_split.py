"""Tests for the patient-level, duplicate-aware split stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.split import (
    SPLITS,
    SplitParams,
    assign_splits,
    find_duplicate_groups,
    run,
)

LABELS = ("lesion", "normal", "other")
SITES = ("siteA", "siteB", "siteC")


def make_cohort(
    seed: int,
    n_patients: int,
    max_images: int,
    n_labels: int = 2,
    n_sites: int = 1,
    n_groups: int = 0,
) -> tuple[pd.DataFrame, list[list[int]]]:
    """A random index (rows shuffled away from patient order) and duplicate groups over its rows."""
    rng = np.random.default_rng(seed)
    records = []
    for p in range(n_patients):
        label = LABELS[rng.integers(n_labels)]
        site = SITES[rng.integers(n_sites)]
        for i in range(int(rng.integers(1, max_images + 1))):
            # a patient's images mostly share a label; some differ
            lab = label if rng.random() < 0.9 else LABELS[rng.integers(n_labels)]
            records.append({"image_id": f"img-{p:03d}-{i}", "patient_key": f"pat-{p:03d}", "label": lab,
                            "site": site, "modality": "CT"})
    index = pd.DataFrame(records)
    index.insert(0, "row", rng.permutation(len(index)))
    groups = []
    for _ in range(n_groups):
        size = int(rng.integers(2, 4))
        groups.append(sorted(rng.choice(len(index), size=min(size, len(index)), replace=False).tolist()))
    return index, groups


def split_of_rows(result: pd.DataFrame, column: str = "split") -> dict[int, object]:
    return dict(zip(result["row"].tolist(), result[column].tolist()))


@st.composite
def cohorts(draw):
    n_patients = draw(st.integers(5, 60))
    n_labels = draw(st.integers(2, 3))
    n_sites = draw(st.integers(1, 3))
    n_groups = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_cohort(seed, n_patients, 6, n_labels, n_sites, n_groups)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cohort=cohorts(),
    seed=st.integers(0, 10_000),
    stratify_by_site=st.booleans(),
    kfold=st.sampled_from([0, 1, 2, 3, 5]),
)
def test_assign_splits_properties(cohort, seed, stratify_by_site, kfold):
    index, groups = cohort
    params = SplitParams(seed=seed, stratify_by_site=stratify_by_site, kfold=kfold)
    result = assign_splits(index, params, groups)

    # pure: input untouched, rows and order kept, every row assigned
    assert "split" not in index.columns
    assert result["row"].tolist() == index["row"].tolist()
    assert set(result["split"]) <= set(SPLITS)
    assert result["split"].notna().all()
    # no patient in two splits, no duplicate group across splits
    assert (result.groupby("patient_key")["split"].nunique() == 1).all()
    by_row = split_of_rows(result)
    for group in groups:
        assert len({by_row[r] for r in group}) == 1
    # deterministic for a seed
    again = assign_splits(index, params, groups)
    pd.testing.assert_frame_equal(result, again)

    if kfold >= 2:
        test_rows = result["split"] == "test"
        assert (result.loc[test_rows, "fold"] == -1).all()
        assert result.loc[~test_rows, "fold"].between(0, kfold - 1).all()
        assert (result.groupby("patient_key")["fold"].nunique() == 1).all()
        by_fold = split_of_rows(result, "fold")
        for group in groups:
            assert len({by_fold[r] for r in group}) == 1
    else:
        assert "fold" not in result.columns


def test_different_seeds_give_different_assignments():
    index, groups = make_cohort(1, 60, 3, n_labels=2, n_groups=3)
    base = assign_splits(index, SplitParams(seed=0), groups)["split"].tolist()
    others = [assign_splits(index, SplitParams(seed=s), groups)["split"].tolist() for s in range(1, 6)]
    assert sum(o != base for o in others) >= 4


def test_cross_patient_duplicates_merge_patients():
    index = pd.DataFrame({
        "row": range(6),
        "image_id": [f"i{r}" for r in range(6)],
        "patient_key": ["a", "a", "b", "c", "c", "d"],
        "label": ["lesion", "normal"] * 3,
        "site": ["s"] * 6,
    })
    # a-b share a group, b-c share another: a, b and c form one unit
    groups = [[1, 2], [2, 3]]
    for seed in range(20):
        result = assign_splits(index, SplitParams(seed=seed), groups)
        assert result.loc[result["patient_key"].isin(["a", "b", "c"]), "split"].nunique() == 1
    # groups naming rows that are not in the index are ignored
    assign_splits(index, SplitParams(), [[4, 99], [100, 101]])


@pytest.mark.parametrize("stratify_by_site", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fractions_within_tolerance(seed, stratify_by_site):
    index, groups = make_cohort(100 + seed, 300, 3, n_labels=3, n_sites=3, n_groups=10)
    params = SplitParams(seed=seed, train=0.7, val=0.15, test=0.15, stratify_by_site=stratify_by_site)
    result = assign_splits(index, params, groups)
    n_patients = result["patient_key"].nunique()
    overall = result["label"].value_counts(normalize=True)
    for split, target in zip(SPLITS, (params.train, params.val, params.test)):
        part = result[result["split"] == split]
        assert abs(part["patient_key"].nunique() / n_patients - target) <= 0.05, split
        balance = part["label"].value_counts(normalize=True).reindex(overall.index, fill_value=0.0)
        assert (balance - overall).abs().max() <= 0.1, (split, balance.to_dict(), overall.to_dict())


def test_kfold_balanced():
    index, groups = make_cohort(7, 300, 3, n_labels=2, n_sites=2, n_groups=5)
    result = assign_splits(index, SplitParams(seed=3, kfold=5), groups)
    dev = result[result["split"] != "test"]
    per_fold = dev.groupby("fold")["patient_key"].nunique()
    assert sorted(per_fold.index) == [0, 1, 2, 3, 4]
    expected = dev["patient_key"].nunique() / 5
    assert (per_fold - expected).abs().max() <= 0.1 * expected + 1


def test_zero_fraction_split_stays_empty():
    index, groups = make_cohort(5, 50, 2, n_groups=2)
    result = assign_splits(index, SplitParams(train=0.8, val=0.0, test=0.2), groups)
    assert (result["split"] != "val").all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"train": 0.7, "val": 0.2, "test": 0.2}, r"train=0.7 val=0.2 test=0.2"),
        ({"train": -0.1, "val": 0.6, "test": 0.5}, r"train"),
        ({"kfold": -1}, r"kfold"),
        ({"near_duplicate_distance": 65}, r"near_duplicate_distance"),
    ],
)
def test_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SplitParams(**kwargs)


# --------------------------------------------------------------------------- duplicates


def smooth_images(n: int, size: int = 64, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth random images in [0, 1]: low-resolution noise, upsampled and blurred."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, channels, 8, 8))
    up = np.kron(coarse, np.ones((size // 8, size // 8)))
    for axis in (2, 3):  # box blur to remove the block edges
        up = sum(np.roll(up, shift, axis=axis) for shift in range(-3, 4)) / 7
    return up.astype(np.float32)


def test_find_duplicate_groups():
    images = smooth_images(8)
    images[6] = images[0]  # exact copy
    rng = np.random.default_rng(1)
    images[7] = np.clip(images[1] * 0.97 + 0.02 + rng.normal(0, 0.005, images[1].shape), 0, 1)  # near
    exact, near = find_duplicate_groups(images, 4)
    assert exact == [[0, 6]]
    assert near == [[1, 7]]

    exact, near = find_duplicate_groups(images, -1)
    assert exact == [[0, 6]] and near == []
    # limited to some rows
    exact, near = find_duplicate_groups(images, 4, rows=[0, 1, 2, 7])
    assert exact == [] and near == [[1, 7]]


def test_find_duplicate_groups_near_group_includes_exact_copies_float16():
    images = smooth_images(6, seed=3).astype(np.float16)
    images[4] = images[2]
    images[5] = np.clip(images[2].astype(np.float32) + 0.01, 0, 1).astype(np.float16)
    exact, near = find_duplicate_groups(images, 4)
    assert exact == [[2, 4]]
    assert near == [[2, 4, 5]]
    # a phash match alone is not enough: a clearly different image with the same coarse layout
    different = images.copy()
    different[5] = np.clip(images[2].astype(np.float32) * 0.8 + 0.1, 0, 1).astype(np.float16)
    exact, near = find_duplicate_groups(different, 64)  # every pair is a phash candidate here
    assert near == [], "candidates must be confirmed pixel-wise"
    # unrelated smooth images are not near-duplicates of each other
    exact, near = find_duplicate_groups(images[:4], 4)
    assert exact == [] and near == []


# --------------------------------------------------------------------------- run


def write_inputs(tmp_path: Path, n_patients: int = 20) -> tuple[Path, Path, pd.DataFrame]:
    index, _ = make_cohort(11, n_patients, 2, n_labels=2, n_sites=2)
    images = smooth_images(len(index), size=32, seed=5)
    # an exact duplicate across two patients (first image of patient 0 and of patient 1)
    r0 = int(index.loc[index["patient_key"] == "pat-000", "row"].iloc[0])
    r1 = int(index.loc[index["patient_key"] == "pat-001", "row"].iloc[0])
    images[r1] = images[r0]
    tensors_path = tmp_path / "tensors.npy"
    np.save(tensors_path, images.astype(np.float16))
    index_path = tmp_path / "index.parquet"
    index.to_parquet(index_path)
    return index_path, tensors_path, index


def test_run_end_to_end(tmp_path):
    index_path, tensors_path, index = write_inputs(tmp_path)
    out = tmp_path / "out"
    summary = run(SplitParams(seed=1, kfold=3), index_path, tensors_path, out)

    splits = pd.read_csv(out / "splits.csv")
    assert list(splits.columns) == ["image_id", "patient_key", "label", "site", "split", "fold"]
    assert splits["image_id"].tolist() == sorted(index["image_id"])
    assert (splits.groupby("patient_key")["split"].nunique() == 1).all()
    assert splits.loc[splits["patient_key"].isin(["pat-000", "pat-001"]), "split"].nunique() == 1

    data = json.loads((out / "split_summary.json").read_text())
    assert data["patients_in_multiple_splits"] == 0
    assert data["duplicate_groups_exact"] == 1
    assert data["duplicate_groups_near"] == 0
    assert data["duplicate_images"] == 2
    assert data["cross_patient_duplicate_groups"] == 1
    assert data["seed"] == 1 and data["kfold"] == 3
    assert sum(data["images"].values()) == len(index)
    assert sum(data["patients"].values()) == index["patient_key"].nunique()
    assert data == json.loads(json.dumps(summary.__dict__))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    # rerun: same result
    run(SplitParams(seed=1, kfold=3), index_path, tensors_path, out)
    pd.testing.assert_frame_equal(pd.read_csv(out / "splits.csv"), splits)


def test_run_rejects_bad_index(tmp_path):
    index_path, tensors_path, index = write_inputs(tmp_path)
    bad = tmp_path / "bad_index.parquet"

    index.drop(columns=["site"]).to_parquet(bad)
    with pytest.raises(ValueError, match=r"bad_index\.parquet.*site"):
        run(SplitParams(), bad, tensors_path, tmp_path / "out")

    index.iloc[:0].to_parquet(bad)
    with pytest.raises(ValueError, match=r"bad_index\.parquet.*empty"):
        run(SplitParams(), bad, tensors_path, tmp_path / "out")

    index.assign(row=index["row"] + 1).to_parquet(bad)
    with pytest.raises(ValueError, match=r"bad_index\.parquet.*out of range.*tensors\.npy"):
        run(SplitParams(), bad, tensors_path, tmp_path / "out")
    assert not (tmp_path / "out" / "splits.csv").exists()


# --------------------------------------------------------------------------- sticky assignment


@pytest.mark.parametrize("kfold", [0, 3])
def test_new_patients_are_dealt_and_known_patients_keep_their_split(kfold):
    """Next week's run: 40 new patients arrive; nobody from last week's training set lands in test."""
    index, groups = make_cohort(11, 160, 4)
    old_patients = sorted(index["patient_key"].unique())[:120]
    old = index[index["patient_key"].isin(old_patients)]
    params = SplitParams(seed=5, kfold=kfold)
    before = assign_splits(old, params, [])
    after = assign_splits(index, params, [], previous=before)

    was = dict(zip(before["patient_key"], before["split"]))
    now = dict(zip(after["patient_key"], after["split"]))
    assert all(now[p] == was[p] for p in old_patients)
    if kfold:
        assert dict(zip(before["patient_key"], before["fold"])) == {
            p: f for p, f in zip(after["patient_key"], after["fold"]) if p in was}
    new = [p for p in now if p not in was]
    assert len(new) == 40 and set(now[p] for p in new) == set(SPLITS)
    patients_per_split = pd.Series(now).value_counts()
    assert abs(patients_per_split["test"] - 0.15 * 160) <= 3, patients_per_split
    assert not after["moved"].any() and after["new"].sum() == (after["patient_key"].isin(new)).sum()
    # without the previous assignment the same cohort is re-dealt, and old patients move
    fresh = dict(zip(*assign_splits(index, params, [])[["patient_key", "split"]].T.values))
    assert sum(fresh[p] != was[p] for p in old_patients) > 10


def test_a_duplicate_that_joins_two_splits_moves_one_patient_and_says_so():
    index, _ = make_cohort(3, 30, 2)
    before = assign_splits(index, SplitParams(seed=0), [])
    by_split = before.drop_duplicates("patient_key").groupby("split")["row"].first()
    joined = [[int(by_split["train"]), int(by_split["test"])]]  # a new near-duplicate across splits
    after = assign_splits(index, SplitParams(seed=0), joined, previous=before)
    assert (after.groupby("patient_key")["split"].nunique() == 1).all()
    pair = after[after["row"].isin(joined[0])]
    assert pair["split"].nunique() == 1 and after.drop_duplicates("patient_key")["moved"].sum() == 1


def test_run_keeps_the_previous_splits_unless_the_assignment_params_change(tmp_path):
    index_path, tensors_path, index = write_inputs(tmp_path)
    out = tmp_path / "out"
    run(SplitParams(seed=1), index_path, tensors_path, out)
    first = pd.read_csv(out / "splits.csv")
    # a stale assignment (hand-edited here) is kept as long as the params match ...
    flipped = first.assign(split=first["split"].map({"train": "val", "val": "test", "test": "train"}))
    flipped.to_csv(out / "splits.csv", index=False)
    summary = run(SplitParams(seed=1), index_path, tensors_path, out)
    assert pd.read_csv(out / "splits.csv")["split"].tolist() == flipped["split"].tolist()
    assert summary.patients_kept == index["patient_key"].nunique() and summary.patients_new == 0
    # ... and dropped when they don't (another seed) or when sticky is off
    for params in (SplitParams(seed=2), SplitParams(seed=1, sticky=False)):
        summary = run(params, index_path, tensors_path, out)
        assert summary.patients_kept == 0 and summary.patients_new == index["patient_key"].nunique()
    assert pd.read_csv(out / "splits.csv")["split"].tolist() == first["split"].tolist()
