"""How well thumbnail groups recover GTSRB's physical signs, and the groups of the test set.

    python benchmarks/gtsrb_sign_groups.py [--seeds 3] [--out benchmarks/results]

GTSRB's test set holds 30-frame tracks of each physical sign, shuffled, with no track id; the
training set's files are named ``<class>/<track>_<frame>.ppm``, so there the truth is known.
This script reads the training images with their track ids (PIL, resized to 32 x 32 bilinear
like the datamodule), groups them with :func:`mixdefense.grouping.near_duplicate_groups` under
several descriptors and linking rules (plain single linkage at a distance threshold; links to
each image's k nearest same-label images; the same with a cap on the group size), and measures
against the true tracks:

* ``pair_recall``: share of same-track frame pairs that end in the same group;
* ``tracks_whole``: share of tracks entirely inside one group (a split track can leak);
* ``frames_in_main``: share of frames in their track's largest group;
* ``groups`` (vs the true tracks) and the largest group (images, share of the set);
* after a class-stratified :func:`~mixdefense.grouping.group_split` into calibration 2000 /
  selection 2000 / test (rest): the share of calibration and selection images whose physical
  sign also has frames in the test split (the leak the groups exist to prevent), and how far
  the class mix of calibration is from the test split's (total variation; classes present).

The training set has 3.1x the test set's images per class (75 vs 25 tracks for the largest
class), and chaining grows with density, so every figure is measured on subsamples of the
training tracks with exactly the test set's number of tracks per class (test counts / 30;
``--seeds`` draws, mean reported, range in the JSON); the chosen setting is also shown on the
whole training set.  Choice: among the settings that keep >= 99% of tracks whole with every
largest group under half a 2000-image split, the one with the most groups; the setting the
brief's 3% cap on the largest group would pick is reported next to it.  The chosen setting is
then applied to the 12,630 test images: number of groups, sizes (all tracks there have exactly
30 frames and every class a multiple of 30 images, so a group whose size is not a multiple of 30
must hold a cut track), largest group, and for the old protocol (evaluate the first 1,000 test
images, calibrate on the last 2,000) the share of the first 1,000 with a same-label group-mate
among the last 2,000.  Writes ``<out>/gtsrb_sign_groups.json`` and ``.md``.  One thread, about
a minute and a half.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mixdefense.grouping import group_split, near_duplicate_groups

SPLITS = {"calibration": 2000, "selection": 2000, "test": None}
BRIEF_CAP = 0.03  # the brief's bound on the largest group (share of the set)
MAX_LARGEST = 1000  # half the smallest split: a split then overshoots its size by less than half


def load_training_tracks(root: Path, size: int = 32):
    """``(images uint8 [N, 3, size, size], labels [N], tracks [N])`` of ``root/GTSRB/Training``.

    Files ``<class:05d>/<track:05d>_<frame:05d>.ppm`` in sorted order (the datamodule's order);
    the track id is ``class * 1000 + track``.
    """
    files = sorted((root / "GTSRB" / "Training").glob("*/*.ppm"))
    if not files:
        raise FileNotFoundError(f"no GTSRB training images under {root / 'GTSRB' / 'Training'}")
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    tracks = np.empty(len(files), dtype=np.int64)
    for k, f in enumerate(files):
        with Image.open(f) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            images[k] = np.asarray(img)
        labels[k] = int(f.parent.name)
        tracks[k] = labels[k] * 1000 + int(f.stem.split("_")[0])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, tracks


def load_test(root: Path):
    # the benchmark may use the datamodule; the package does not
    from datamodules.gtsrb import GTSRBDataModule

    x, y = GTSRBDataModule(data_root=str(root.parent)).load_split(train=False)
    return x, y.numpy()


def test_density_subsample(labels, tracks, test_counts, seed):
    """Indices of whole training tracks: per class, as many tracks as the test set has (count / 30)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c, count in enumerate(test_counts):
        ids = np.unique(tracks[labels == c])
        pick = rng.choice(ids, min(len(ids), max(1, round(count / 30))), replace=False)
        keep.append(np.flatnonzero(np.isin(tracks, pick)))
    return np.sort(np.concatenate(keep))


def track_figures(groups: np.ndarray, tracks: np.ndarray) -> dict:
    n = len(groups)
    _, t = np.unique(tracks, return_inverse=True)
    t_count = np.bincount(t)
    keys, kc = np.unique(t.astype(np.int64) * n + groups, return_counts=True)
    per_track_groups = np.bincount(keys // n, minlength=len(t_count))
    main = np.zeros(len(t_count), dtype=np.int64)
    np.maximum.at(main, keys // n, kc)
    sizes = np.bincount(groups)
    return {"pair_recall": float((kc * (kc - 1)).sum() / (t_count * (t_count - 1)).sum()),
            "tracks_whole": float((per_track_groups == 1).mean()),
            "frames_in_main": float(main.sum() / n),
            "groups": len(sizes), "tracks": len(t_count),
            "largest": int(sizes.max()), "largest_share": float(sizes.max() / n)}


def class_mix(parts: dict, labels: np.ndarray) -> dict:
    p = {k: np.bincount(labels[v.numpy()], minlength=43) / max(1, len(v)) for k, v in parts.items()}
    return {"class_tv": float(0.5 * np.abs(p["calibration"] - p["test"]).sum()),
            "calibration_classes": int((p["calibration"] > 0).sum())}


def split_figures(groups: np.ndarray, tracks: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """A class-stratified group split: leak of calibration / selection into test, and the class mix."""
    try:
        parts = group_split(torch.from_numpy(groups), SPLITS, seed=seed, strata=torch.from_numpy(labels))
    except ValueError:
        return {"calibration_leak": math.nan, "selection_leak": math.nan, "class_tv": math.nan,
                "calibration_classes": math.nan}
    in_test = np.isin(tracks, tracks[parts["test"].numpy()])
    return {"calibration_leak": float(in_test[parts["calibration"].numpy()].mean()),
            "selection_leak": float(in_test[parts["selection"].numpy()].mean()), **class_mix(parts, labels)}


def old_protocol_share(groups: np.ndarray, first: int = 1000, last: int = 2000) -> float:
    """Share of the first ``first`` images with a group-mate among the last ``last`` (groups never mix labels)."""
    return float(np.isin(groups[:first], groups[-last:]).mean())


def evaluate(method, name, kwargs, x, labels, tracks, subsamples):
    rows = []
    for seed, keep in enumerate(subsamples):
        t0 = time.perf_counter()
        g = near_duplicate_groups(x[torch.from_numpy(keep)], torch.from_numpy(labels[keep]), **kwargs).numpy()
        seconds = time.perf_counter() - t0
        rows.append({**track_figures(g, tracks[keep]), **split_figures(g, tracks[keep], labels[keep], seed),
                     "seconds": seconds})
    out = {"method": method, "name": name, "kwargs": kwargs}
    for key in rows[0]:
        vals = np.array([r[key] for r in rows], dtype=float)
        ok = not np.isnan(vals).all()
        out[key] = float(np.nanmean(vals)) if ok else None
        out[key + "_range"] = [float(np.nanmin(vals)), float(np.nanmax(vals))] if ok else None
    return out


DESCRIPTORS = {  # name: thumbnail keyword arguments
    "colour 4x4": {"size": 4, "colour": True, "normalise": False},
    "colour 8x8 normalised": {"size": 8, "colour": True, "normalise": True},
    "colour 16x16 normalised": {"size": 16, "colour": True, "normalise": True},
    "grey 12x12 normalised": {"size": 12, "colour": False, "normalise": True},
}
SL_THRESHOLDS = {"colour 4x4": [0.2, 0.45, 0.8, 1.0, 1.2], "normalised": [0.4, 0.6, 0.8, 0.9, 1.0]}
NEIGHBOURS = [5, 7, 10, 15]
CAPS = [0.03, 0.01, 60]


def settings():
    for dname, dkw in DESCRIPTORS.items():
        for th in SL_THRESHOLDS["normalised" if dkw["normalise"] else "colour 4x4"]:
            yield "single linkage", f"{dname}, t={th}", dict(threshold=th, neighbours=None, max_group=None, **dkw)
    for dname in ("colour 4x4", "colour 8x8 normalised", "colour 16x16 normalised"):
        for k in NEIGHBOURS:
            yield "k nearest", f"{dname}, k={k}", dict(threshold=math.inf, neighbours=k, max_group=None, **DESCRIPTORS[dname])
    for dname in ("colour 4x4", "colour 8x8 normalised"):
        for cap in CAPS:
            yield ("k nearest, capped", f"{dname}, k=10, cap={cap}",
                   dict(threshold=math.inf, neighbours=10, max_group=cap, **DESCRIPTORS[dname]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("MIXDEFENSE_DATA", "data"))
    ap.add_argument("--seeds", type=int, default=3, help="test-density subsamples of the training tracks")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    root = Path(args.data) / "gtsrb"
    x_train, y_train, t_train = load_training_tracks(root)
    x_test, y_test = load_test(root)
    load_s = time.perf_counter() - start
    test_counts = np.bincount(y_test, minlength=43)
    subsamples = [test_density_subsample(y_train, t_train, test_counts, s) for s in range(args.seeds)]

    rows = []
    for method, name, kw in settings():
        rows.append(evaluate(method, name, kw, x_train, y_train, t_train, subsamples))
    print(f"[{time.perf_counter() - start:4.0f}s] {len(rows)} settings measured", flush=True)

    ok = [r for r in rows if r["tracks_whole"] >= 0.99 and r["largest_range"][1] < MAX_LARGEST]
    if ok:
        chosen = max(ok, key=lambda r: (r["groups"], r["tracks_whole"]))
    else:
        chosen = max((r for r in rows if r["largest_share_range"][1] < BRIEF_CAP), key=lambda r: r["tracks_whole"])
    under_cap = max((r for r in rows if r["largest_share_range"][1] < BRIEF_CAP),
                    key=lambda r: (r["tracks_whole"], r["frames_in_main"]))
    ckw = chosen["kwargs"]

    g_full = near_duplicate_groups(x_train, torch.from_numpy(y_train), **ckw).numpy()
    full = track_figures(g_full, t_train)

    # the old protocol on the training subsamples, shuffled like the test set: truth and group-mates
    old_truth, old_groups = [], []
    for seed, keep in enumerate(subsamples):
        idx = keep[np.random.default_rng(100 + seed).permutation(len(keep))]
        old_truth.append(old_protocol_share(np.unique(t_train[idx], return_inverse=True)[1]))
        g = near_duplicate_groups(x_train[torch.from_numpy(idx)], torch.from_numpy(y_train[idx]), **ckw).numpy()
        old_groups.append(old_protocol_share(g))

    t0 = time.perf_counter()
    g_test = near_duplicate_groups(x_test, torch.from_numpy(y_test), **ckw).numpy()
    test_s = time.perf_counter() - t0
    sizes = np.bincount(g_test)
    parts = group_split(torch.from_numpy(g_test), SPLITS, seed=0, strata=torch.from_numpy(y_test))
    g_cap = near_duplicate_groups(x_test, torch.from_numpy(y_test), **under_cap["kwargs"]).numpy()
    cap_sizes = np.bincount(g_cap)
    test = {
        "images": len(g_test), "groups": len(sizes), "tracks_expected": int(len(g_test) // 30),
        "largest": int(sizes.max()), "largest_share": float(sizes.max() / len(g_test)),
        "largest_label": int(y_test[g_test == sizes.argmax()][0]),
        "size_quantiles": {q: float(np.quantile(sizes, float(q))) for q in ("0.1", "0.25", "0.5", "0.75", "0.9")},
        "size_histogram": {f"{lo}-{hi}" if hi else f">={lo}": int(((sizes >= lo) & (sizes <= (hi or 10 ** 9))).sum())
                           for lo, hi in ((1, 29), (30, 30), (31, 59), (60, 60), (61, 149), (150, 299), (300, None))},
        "groups_multiple_of_30": int((sizes % 30 == 0).sum()),
        "images_in_groups_multiple_of_30": float(sizes[sizes % 30 == 0].sum() / len(g_test)),
        "classes_in_one_group": int(sum(len(np.unique(g_test[y_test == c])) == 1 for c in range(43))),
        "old_protocol_first1000_with_groupmate_in_last2000": old_protocol_share(g_test),
        "split_seed0_sizes": {k: len(v) for k, v in parts.items()},
        "split_seed0": class_mix(parts, y_test),
        "seconds": test_s,
        "under_brief_cap": {"setting": under_cap["name"], "groups": len(cap_sizes), "largest": int(cap_sizes.max()),
                            "images_in_groups_multiple_of_30": float(cap_sizes[cap_sizes % 30 == 0].sum() / len(g_cap)),
                            "old_protocol_first1000_with_groupmate_in_last2000": old_protocol_share(g_cap)},
    }
    report = {
        "setup": {"training_images": len(y_train), "training_tracks": len(np.unique(t_train)),
                  "subsamples": args.seeds, "subsample_images": [len(k) for k in subsamples],
                  "subsample_tracks": [len(np.unique(t_train[k])) for k in subsamples],
                  "splits": SPLITS, "max_largest": MAX_LARGEST, "brief_cap": BRIEF_CAP, "threads": 1},
        "rows": rows,
        "chosen": chosen,
        "best_under_brief_cap": under_cap,
        "chosen_on_full_training_set": full,
        "old_protocol_on_training_subsamples": {"true_same_sign_share": float(np.mean(old_truth)),
                                                "groupmate_share": float(np.mean(old_groups))},
        "test": test,
        "runtime_s": {"loading": load_s, "total": time.perf_counter() - start},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gtsrb_sign_groups.json").write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    (out / "gtsrb_sign_groups.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _json_safe(v):
    """Infinities as the string "inf" and NaN as null (strict JSON)."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _kwargs(kw: dict) -> str:
    def show(v):
        return "math.inf" if isinstance(v, float) and math.isinf(v) else repr(v)

    return ", ".join(f"{k}={show(v)}" for k, v in kw.items())


def markdown(r: dict) -> str:
    s, c, cap, test = r["setup"], r["chosen"], r["best_under_brief_cap"], r["test"]
    full, old = r["chosen_on_full_training_set"], r["old_protocol_on_training_subsamples"]
    lines = [
        "# GTSRB: grouping test images by physical sign",
        "",
        ("Generated by `benchmarks/gtsrb_sign_groups.py` (one thread). Measured on the training set, whose file "
        f"names give the true tracks ({s['training_images']} images, {s['training_tracks']} tracks), on "
        f"{s['subsamples']} random subsamples of whole tracks with the test set's number of tracks per class "
        f"({s['subsample_images'][0]} images, {s['subsample_tracks'][0]} tracks each; the full training set has "
        "3.1x more signs per class and so chains more). Mean over the draws (ranges in the JSON). After grouping, "
        "a class-stratified `group_split` (seed = draw) makes calibration 2000 / selection 2000 / test: *leak* is "
        "the share of calibration (selection) images whose physical sign also has frames in test; *class TV* the "
        "total-variation distance between the class mixes of calibration and test (true tracks as groups give "
        "about 0.15, a random image split about 0.05); *cal. classes* the classes present in calibration (of 43)."),
        "",
        ("| method | setting | pairs together % | tracks whole % | frames in main group % | groups (tracks) "
        "| largest group (% of set) | cal. leak % | sel. leak % | class TV | cal. classes |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        tv = "–" if row["class_tv"] is None else f"{row['class_tv']:.2f}"
        cc = "–" if row["calibration_classes"] is None else f"{row['calibration_classes']:.0f}"
        lines.append(f"| {row['method']} | {row['name']} | {_pct(row['pair_recall'])} | {_pct(row['tracks_whole'])} "
                     f"| {_pct(row['frames_in_main'])} | {row['groups']:.0f} ({row['tracks']:.0f}) "
                     f"| {row['largest']:.0f} ({_pct(row['largest_share'])}) | {_pct(row['calibration_leak'])} "
                     f"| {_pct(row['selection_leak'])} | {tv} | {cc} |")
    lines += [
        "",
        ("Single linkage (link every same-label pair within a distance) chains whole classes together long before it "
        "keeps the tracks whole: the first (tiny) and last (close-up) frames of a track are often nearer to another "
        "sign of the class than to their own track. Linking each image to its k nearest same-label images instead "
        "keeps almost every track whole, but the groups are then unions of similar tracks, up to a whole class. "
        "Capping the group size (closest links first) cuts tracks: no setting reaches 99% whole tracks with the "
        f"largest group under {100 * s['brief_cap']:.0f}% of the set."),
        "",
        (f"**Chosen** (>= 99% of tracks whole, largest group < {s['max_largest']} images in every draw, then the most "
        f"groups): `{c['name']}`, i.e. `near_duplicate_groups(images, labels, {_kwargs(c['kwargs'])})` (the "
        f"package defaults): {_pct(c['tracks_whole'])}% of tracks whole, {_pct(c['pair_recall'])}% of same-track "
        f"pairs together, {_pct(c['frames_in_main'])}% of frames in their track's main group; {c['groups']:.0f} "
        f"groups for {c['tracks']:.0f} tracks, largest {c['largest']:.0f} images ({_pct(c['largest_share'])}%); "
        f"leak {_pct(c['calibration_leak'])}% / {_pct(c['selection_leak'])}%, class TV {c['class_tv']:.2f}, "
        f"{c['calibration_classes']:.0f} classes in calibration."),
        "",
        (f"Under the brief's {100 * s['brief_cap']:.0f}% cap the best is `{cap['name']}`: {_pct(cap['tracks_whole'])}% "
        f"of tracks whole, {_pct(cap['frames_in_main'])}% of frames in the main group, leak "
        f"{_pct(cap['calibration_leak'])}% / {_pct(cap['selection_leak'])}%, class TV {cap['class_tv']:.2f}."),
        "",
        (f"Chosen setting on the whole training set (39,209 images, 3.1x the density): {_pct(full['tracks_whole'])}% "
        f"of tracks whole, {_pct(full['pair_recall'])}% of pairs together, {_pct(full['frames_in_main'])}% of frames "
        f"in the main group, {full['groups']} groups for {full['tracks']} tracks, largest {full['largest']} "
        f"({_pct(full['largest_share'])}%)."),
        "",
        ("Old protocol on the training subsamples (shuffled like the test set): "
        f"{_pct(old['true_same_sign_share'])}% of the first 1,000 images share their physical sign with one of "
        f"the last 2,000; {_pct(old['groupmate_share'])}% have a group-mate there (chosen setting)."),
        "",
        f"## Test set ({test['images']} images; {test['tracks_expected']} tracks of exactly 30 frames)",
        "",
        (f"- chosen setting: {test['groups']} groups; largest {test['largest']} images "
        f"({_pct(test['largest_share'])}% of the set, class {test['largest_label']}); "
        f"{test['classes_in_one_group']} of 43 classes form a single group."),
        (f"- {test['groups_multiple_of_30']} of {test['groups']} groups, holding "
        f"{_pct(test['images_in_groups_multiple_of_30'])}% of the images, have a size that is a multiple of 30 "
        "(a group of whole tracks must; one that is not holds a cut track)."),
        "- group sizes, quantiles: " + ", ".join(f"q{q}: {v:.0f}" for q, v in test["size_quantiles"].items()),
        "- group sizes, counts: " + ", ".join(f"{k}: {v}" for k, v in test["size_histogram"].items()),
        (f"- old protocol: {_pct(test['old_protocol_first1000_with_groupmate_in_last2000'])}% of the first 1,000 test "
        "images have a same-label group-mate among the last 2,000."),
        (f"- class-stratified `group_split` (seed 0): sizes {test['split_seed0_sizes']}; class TV calibration vs test "
        f"{test['split_seed0']['class_tv']:.2f}, {test['split_seed0']['calibration_classes']} classes in calibration."),
        (f"- for comparison, `{test['under_brief_cap']['setting']}`: {test['under_brief_cap']['groups']} groups, "
        f"largest {test['under_brief_cap']['largest']}, "
        f"{_pct(test['under_brief_cap']['images_in_groups_multiple_of_30'])}% of images in groups of a multiple of 30."),
        "",
        (f"Runtime: {r['runtime_s']['total']:.0f} s on one thread (reading the images: {r['runtime_s']['loading']:.0f} s; "
        f"grouping the test set: {test['seconds']:.1f} s)."),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
