"""Results you can trust at a glance: every result folder's run.json, the generated index, and no drift.

* every ``results/**/run.json`` validates (required keys, status, sha256s) and lies where its status
  says (shipped: ``results/<ds>/<name>/``; others: ``results/experiments/<ds>/<name>/``);
* ``results/INDEX.md`` is exactly what ``mixdefense results-index`` generates (never edited by hand);
* a shipped record's artifact hashes are those of the files now in ``artifacts/``; a ``path@commit``
  artifact is checked against git history;
* no tracked text file under results/, artifacts/, experiments/, benchmarks/results/ holds an absolute
  machine path.

Fast: no data, no torch (the module is loaded from its file, not through the package).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
_spec = importlib.util.spec_from_file_location("results_index", REPO / "src/mixdefense/commands/results_index.py")
ri = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ri)

ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:work|tmp|root|home|Users)/")
TRACKED_ROOTS = ("results", "artifacts", "experiments", "benchmarks/results")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=False)


def _has_git_history() -> bool:
    return shutil.which("git") is not None and _git("rev-parse", "--git-dir").returncode == 0


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return ri.collect(RESULTS)


def test_every_run_json_validates(records):
    folders = {r["folder"] for r in records}
    on_disk = {p.parent.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("run.json")}
    assert records and folders == on_disk


def test_every_result_folder_has_a_record(records):
    """Every tracked result file (INDEX.md aside) lies in a record's folder or below one."""
    if not _has_git_history():
        pytest.skip("no git repository: the tracked result files are listed with `git ls-files`")
    folders = [RESULTS / r["folder"] for r in records]
    loose = []
    for name in filter(None, _git("ls-files", "-z", "--", "results").stdout.decode().split("\0")):
        f = REPO / name
        if f.parent == RESULTS:
            continue
        if not any(folder == f.parent or folder in f.parents for folder in folders):
            loose.append(name)
    assert not loose, f"tracked result files without a run.json above them: {loose}"


def test_no_partial_rows_tracked():
    if not _has_git_history():
        pytest.skip("no git repository")
    tracked = [n for n in _git("ls-files", "--", "results").stdout.decode().split("\n") if "/partial/" in n]
    assert not tracked, f"resume scratch (partial/) is never tracked: {tracked}"


def test_index_is_generated_not_edited(records):
    index = RESULTS / ri.INDEX_NAME
    assert index.is_file(), "results/INDEX.md is missing: run `mixdefense results-index`"
    assert index.read_text(encoding="utf-8") == ri.render(records), (
        "results/INDEX.md differs from what the run.json files give: run `mixdefense results-index` "
        "(do not edit INDEX.md by hand)")
    assert ri.main(["--root", str(RESULTS), "--check"]) == 0


def test_shipped_only_under_dataset_folders(records):
    for r in records:
        parts = Path(r["folder"]).parts
        if r["status"] == "shipped":
            assert len(parts) == 2 and parts[0] == r["dataset"], f"{r['folder']}: shipped records live in results/<ds>/<name>/"
        else:
            assert len(parts) == 3 and parts[:2] == ("experiments", r["dataset"]), (
                f"{r['folder']}: {r['status']} records live in results/experiments/<ds>/<name>/")
    assert all(r["status"] == "shipped" for r in records if not r["folder"].startswith("experiments/"))


def _artifact_cases(records, shipped: bool):
    return [(r["folder"], key, digest) for r in records if (r["status"] == "shipped") == shipped
            for key, digest in r["artifacts"].items()]


def test_shipped_artifact_hashes_are_the_current_files(records):
    cases = _artifact_cases(records, shipped=True)
    assert cases
    stale, pinned = [], []
    for folder, key, digest in cases:
        path, commit = ri.split_artifact_key(key)
        if commit is not None:
            pinned.append(f"{folder}: {key}")
            continue
        file = REPO / path
        assert file.is_file(), f"results/{folder}/run.json: shipped artifact {path} does not exist"
        if ri.sha256_file(file) != digest:
            stale.append(f"results/{folder}/run.json: {path}")
    assert not stale, ("shipped artifacts changed since their results were recorded (rerun the run, or after a "
                       f"rebuild with the same verdicts `mixdefense results-index --refresh-shipped`): {stale}")
    if pinned:
        pytest.skip(f"shipped artifacts pinned to a commit (only checkable against git history): {pinned}")


def test_other_records_name_files_that_still_hold_those_bytes(records):
    """A non-shipped record's plain path must still hold the bytes the run used (else it is path@commit)."""
    moved = []
    for folder, key, digest in _artifact_cases(records, shipped=False):
        path, commit = ri.split_artifact_key(key)
        if commit is None and (not (REPO / path).is_file() or ri.sha256_file(REPO / path) != digest):
            moved.append(f"results/{folder}/run.json: {path}")
    assert not moved, f"files changed under non-shipped records (`mixdefense results-index --refresh-shipped` pins them): {moved}"


def test_pinned_artifacts_and_commits_match_git_history(records):
    if not _has_git_history():
        pytest.skip("no git repository: path@commit artifacts and commits can only be checked against git history")
    missing = sorted({r["commit"] for r in records if _git("cat-file", "-e", f"{r['commit']}^{{commit}}").returncode})
    if missing and _git("rev-parse", "--is-shallow-repository").stdout.strip() == b"true":
        pytest.skip(f"shallow clone: commits {missing} are not here")
    assert not missing, f"records name commits that do not exist: {missing}"
    wrong = []
    for r in records:
        for key, digest in r["artifacts"].items():
            path, commit = ri.split_artifact_key(key)
            if commit is None:
                continue
            blob = _git("show", f"{commit}:{path}")
            if blob.returncode or hashlib.sha256(blob.stdout).hexdigest() != digest:
                wrong.append(f"results/{r['folder']}/run.json: {key}")
    assert not wrong, f"path@commit artifacts whose `git show commit:path` has another sha256: {wrong}"


def test_no_absolute_machine_paths_in_tracked_files():
    if not _has_git_history():
        pytest.skip("no git repository: the tracked files are listed with `git ls-files`")
    files = _git("ls-files", "-z", "--", *TRACKED_ROOTS).stdout.decode().split("\0")
    found = []
    for name in filter(None, files):
        path = REPO / name
        if not path.is_file():
            continue  # deleted in the work tree, not yet from the index
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary (weights, figures)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if ABSOLUTE.search(line):
                found.append(f"{name}:{n}: {line.strip()[:120]}")
    assert not found, "absolute machine paths (use repository-relative ones):\n" + "\n".join(found)


def test_validation_names_the_bad_file(tmp_path):
    """collect() rejects a malformed record with a message naming the file."""
    good = {"name": "x", "dataset": "mnist", "kind": "sweep", "status": "shipped", "reason": "r",
            "command": "make evaluate DATASET=mnist", "commit": "abc1234", "artifacts": {"artifacts/mnist/detector.pt": "0" * 64}}
    cases = {
        "mnist/x": ({**good, "status": "kept"}, "status"),
        "experiments/mnist/x": (good, "belongs in"),
        "mnist/y": ({**good, "name": "y", "artifacts": {"artifacts/mnist/detector.pt": "abc"}}, "sha256"),
        "mnist/z": ({k: v for k, v in {**good, "name": "z"}.items() if k != "command"}, "command"),
        "mnist/w": ({**good, "name": "w", "artifacts": {"/work/main/artifacts/mnist/detector.pt": "0" * 64}}, "relative"),
    }
    for folder, (record, message) in cases.items():
        root = tmp_path / folder.replace("/", "_")
        (root / folder).mkdir(parents=True)
        (root / folder / "run.json").write_text(json.dumps(record))
        with pytest.raises(ValueError, match=message) as e:
            ri.collect(root)
        assert str(root / folder / "run.json") in str(e.value)


def test_refresh_rehashes_shipped_and_pins_the_rest(tmp_path):
    repo = tmp_path
    (repo / "artifacts/mnist").mkdir(parents=True)
    art = repo / "artifacts/mnist/detector.pt"
    art.write_bytes(b"old")
    old = ri.sha256_file(art)
    base = {"dataset": "mnist", "kind": "sweep", "reason": "r", "command": "c", "commit": "abc1234",
            "artifacts": {"artifacts/mnist/detector.pt": old}}
    for folder, status in (("mnist/mixdefense", "shipped"), ("experiments/mnist/old", "superseded")):
        (repo / "results" / folder).mkdir(parents=True)
        (repo / "results" / folder / "run.json").write_text(json.dumps({"name": Path(folder).name, "status": status, **base}))
    art.write_bytes(b"rebuilt")
    changed = ri.refresh_shipped_hashes(repo / "results")
    assert len(changed) == 2
    shipped = json.loads((repo / "results/mnist/mixdefense/run.json").read_text())
    other = json.loads((repo / "results/experiments/mnist/old/run.json").read_text())
    assert shipped["artifacts"] == {"artifacts/mnist/detector.pt": ri.sha256_file(art)}
    assert other["artifacts"] == {"artifacts/mnist/detector.pt@abc1234": old}
    assert ri.refresh_shipped_hashes(repo / "results") == []
    assert ri.main(["--root", str(repo / "results")]) == 0 and ri.main(["--root", str(repo / "results"), "--check"]) == 0
    (repo / "results/INDEX.md").write_text((repo / "results/INDEX.md").read_text() + "edited by hand\n")
    assert ri.main(["--root", str(repo / "results"), "--check"]) == 1
