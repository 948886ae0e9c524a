"""The results index: one ``run.json`` per result folder, and ``results/INDEX.md`` generated from them.

Every folder of results carries a ``run.json`` saying what made it and whether to trust it::

    {"name": "mixdefense", "dataset": "gtsrb", "kind": "sweep",
     "status": "shipped",                     # shipped | candidate | incomplete | superseded | rejected
     "reason": "one line: why this status (for shipped: what it is)",
     "command": "make evaluate DATASET=gtsrb",
     "commit": "293e4aa",                     # the commit that last wrote the folder's results
     "artifacts": {"artifacts/gtsrb/detector.pt": "<sha256 of the file the run used>"},
     "summary": {...},                        # optional: headline numbers copied from the folder's files
     "note": "..."}                           # optional: anything else a reader must know

Where a folder may live follows from its status: ``results/<dataset>/<name>/`` holds only what the
artifacts shipped in ``artifacts/<dataset>/`` produce (status ``shipped``); everything else lives in
``results/experiments/<dataset>/<name>/``.  An artifact key is a repository-relative path; a key
``path@<commit>`` names a file that no longer exists as the run used it (``git show <commit>:path``
gives it back, and the sha256 says which bytes).

    mixdefense results-index                    # validate every run.json, write results/INDEX.md
    mixdefense results-index --check            # exit 1 when results/INDEX.md is not what would be written
    mixdefense results-index --refresh-shipped  # re-hash the shipped records' artifacts from the current
                                                # files (after a rebuild), then write results/INDEX.md

Plain Python (standard library only): no torch, no Lightning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

STATUSES = ("shipped", "candidate", "incomplete", "superseded", "rejected")
REQUIRED = ("name", "dataset", "kind", "status", "reason", "command", "commit", "artifacts")
STRING_KEYS = ("name", "dataset", "kind", "status", "reason", "command", "commit")
DATASET_ORDER = ("mnist", "cifar10", "gtsrb")
EXPERIMENTS = "experiments"
INDEX_NAME = "INDEX.md"
RECORD_NAME = "run.json"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{7,40}")
_ARTIFACT_KEY = re.compile(r"(?P<path>[^@]+)(?:@(?P<commit>[0-9a-f]{7,40}))?")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_artifact_key(key: str) -> tuple[str, str | None]:
    """``"artifacts/gtsrb/metric.pt@aa0d67f"`` → ``("artifacts/gtsrb/metric.pt", "aa0d67f")``; no ``@``: commit None."""
    m = _ARTIFACT_KEY.fullmatch(key)
    if not m:
        raise ValueError(f"artifact key {key!r} is not 'path' or 'path@<commit>'")
    return m["path"], m["commit"]


def expected_parent(record: dict) -> Path:
    """The folder a record's folder must sit in, relative to the results root."""
    if record["status"] == "shipped":
        return Path(record["dataset"])
    return Path(EXPERIMENTS) / record["dataset"]


def validate(record: object, where: str) -> dict:
    """Check one parsed run.json; return it, or raise ValueError naming ``where``."""
    def fail(msg: str):
        raise ValueError(f"{where}: {msg}")

    if not isinstance(record, dict):
        fail("run.json must hold a JSON object")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        fail(f"missing key(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    for k in STRING_KEYS:
        if not isinstance(record[k], str) or not record[k].strip():
            fail(f"{k!r} must be a non-empty string")
        if "\n" in record[k]:
            fail(f"{k!r} must be one line")
    if record["status"] not in STATUSES:
        fail(f"status {record['status']!r} is not one of {', '.join(STATUSES)}")
    if not _COMMIT.fullmatch(record["commit"]):
        fail(f"commit {record['commit']!r} is not a 7-40 digit hex commit hash")
    artifacts = record["artifacts"]
    if not isinstance(artifacts, dict):
        fail("'artifacts' must be an object {repo-relative path: sha256}")
    if record["status"] == "shipped" and not artifacts:
        fail("a shipped record names the artifacts that produce it")
    for key, digest in artifacts.items():
        try:
            path, _ = split_artifact_key(key)
        except ValueError as e:
            fail(str(e))
        if path.startswith(("/", "~")) or re.match(r"[A-Za-z]:[\\/]", path) or ".." in Path(path).parts:
            fail(f"artifact path {path!r} must be relative to the repository root")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            fail(f"artifact {key!r}: {digest!r} is not a sha256 (64 lowercase hex digits)")
    if "summary" in record and not isinstance(record["summary"], dict):
        fail("'summary' must be an object")
    if "note" in record and not isinstance(record["note"], str):
        fail("'note' must be a string")
    return record


def collect(root: Path) -> list[dict]:
    """Every ``<root>/**/run.json``, validated, each with ``folder`` (its folder relative to ``root``).

    Raises ValueError naming the file when a record is malformed or lies where its status does not
    allow (shipped: ``<root>/<dataset>/<name>/``; others: ``<root>/experiments/<dataset>/<name>/``).
    """
    root = Path(root)
    records = []
    for path in sorted(root.rglob(RECORD_NAME)):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        validate(record, str(path))
        folder = path.parent.relative_to(root)
        if folder.parent != expected_parent(record):
            raise ValueError(f"{path}: a {record['status']} {record['dataset']} record belongs in "
                             f"{root / expected_parent(record)}/<name>/, not in {root / folder.parent}/")
        if record["name"] != folder.name:
            raise ValueError(f"{path}: name {record['name']!r} differs from its folder {folder.name!r}")
        records.append({**record, "folder": folder.as_posix()})
    return records


def _dataset_key(dataset: str) -> tuple[int, str]:
    return (DATASET_ORDER.index(dataset) if dataset in DATASET_ORDER else len(DATASET_ORDER), dataset)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    text = _cell(text)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def render(records: list[dict]) -> str:
    """The Markdown index: one table per dataset, shipped first, then candidate/incomplete/superseded/rejected."""
    lines = [
        "# Results index",
        "",
        "<!-- Generated by `mixdefense results-index` from results/**/run.json. Do not edit by hand. -->",
        ("Generated by `mixdefense results-index` from the `run.json` of every result folder: **do not edit "
        "this file by hand** — edit the folder's `run.json` and run `mixdefense results-index` again "
        "(`--check` tells whether this file is current; a test fails when it is not)."),
        "",
        ("`results/<dataset>/<name>/` holds only what the artifacts shipped in `artifacts/<dataset>/` "
        "produce (status **shipped**); everything else is in `results/experiments/<dataset>/<name>/`: "
        "**candidate** (newer parts, not shipped yet), **incomplete** (an unfinished run), **superseded** "
        "(made with parts since replaced, or a variant of the run that took its place), **rejected** (a variant "
        "measured and not kept).  Each `run.json` lists the sha256 of the artifacts its run used (`path@commit`: no longer in the tree as used; "
        "`git show commit:path`)."),
    ]
    by_dataset: dict[str, list[dict]] = {}
    for r in records:
        by_dataset.setdefault(r["dataset"], []).append(r)
    for dataset in sorted(by_dataset, key=_dataset_key):
        rows = sorted(by_dataset[dataset], key=lambda r: (STATUSES.index(r["status"]), r["folder"]))
        counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in STATUSES
                           if any(r["status"] == s for r in rows))
        lines += ["", f"## {dataset}", "", f"{len(rows)} folders: {counts}.", "",
                  "| folder | kind | status | reason | commit | command |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            link = f"[{_cell(r['folder'])}/]({r['folder']}/)"
            status = f"**{r['status']}**" if r["status"] == "shipped" else r["status"]
            lines.append(f"| {link} | {_cell(r['kind'])} | {status} | {_cell(r['reason'])} | "
                         f"`{r['commit']}` | {_code(r['command'])} |")
    return "\n".join(lines) + "\n"


def _write_record(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def refresh_shipped_hashes(root: Path, repo: Path | None = None) -> list[Path]:
    """Re-hash the artifacts of every shipped record from the current files; return the run.json files rewritten.

    For a record with status ``shipped`` each plain artifact path gets the sha256 of the file now at
    ``<repo>/<path>`` (run it after rebuilding a shipped artifact whose verdicts did not change).  A
    non-shipped record never takes new hashes: when a plain path of one no longer holds the bytes it
    used, the key becomes ``path@<record's commit>`` (same sha256), so it keeps naming what the run used.
    ``repo`` defaults to the folder above ``root``.
    """
    root = Path(root)
    repo = Path(repo) if repo is not None else root.resolve().parent
    changed = []
    for path in sorted(root.rglob(RECORD_NAME)):
        record = validate(json.loads(path.read_text(encoding="utf-8")), str(path))
        artifacts: dict[str, str] = {}
        for key, digest in record["artifacts"].items():
            rel, commit = split_artifact_key(key)
            if commit is not None:
                artifacts[key] = digest
                continue
            file = repo / rel
            if record["status"] == "shipped":
                if not file.is_file():
                    raise ValueError(f"{path}: shipped artifact {rel} does not exist")
                artifacts[key] = sha256_file(file)
            elif file.is_file() and sha256_file(file) == digest:
                artifacts[key] = digest
            else:
                artifacts[f"{rel}@{record['commit']}"] = digest
        if artifacts != record["artifacts"] or list(artifacts) != list(record["artifacts"]):
            _write_record(path, {**record, "artifacts": artifacts})
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mixdefense results-index", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="results", help="results folder (default results); INDEX.md is written in it")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 when <root>/INDEX.md differs from what would be generated")
    ap.add_argument("--refresh-shipped", action="store_true",
                    help="first re-hash the shipped records' artifacts from the current files")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"results-index: {root} is not a folder", file=sys.stderr)
        return 2
    if args.refresh_shipped:
        for path in refresh_shipped_hashes(root):
            print(f"refreshed {path}")
    try:
        text = render(collect(root))
    except ValueError as e:
        print(f"results-index: {e}", file=sys.stderr)
        return 1
    index = root / INDEX_NAME
    if args.check:
        current = index.read_text(encoding="utf-8") if index.is_file() else None
        if current != text:
            why = "is missing" if current is None else "differs from what the run.json files give"
            print(f"results-index: {index} {why}; regenerate it with `mixdefense results-index`"
                  f"{'' if args.root == 'results' else f' --root {args.root}'} (never edit it by hand)",
                  file=sys.stderr)
            return 1
        print(f"{index} is current")
        return 0
    index.write_text(text, encoding="utf-8")
    print(f"wrote {index} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
