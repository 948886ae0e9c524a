"""The experiment configs (experiments/**) and the Makefile that runs them.

* every stage file's header states the exact command that runs it, and that command composes and parses with
  the parser LightningCLI builds for ``mixdefense fit|test`` (parsed and validated, nothing instantiated);
* the per-run names still differ per stage (save_dir = default_root_dir, one W&B name per stage);
* no config writes into a shipped ``artifacts/<ds>/`` folder: exports and ``output.layer`` go to
  ``artifacts/candidates/<ds>/``; every ``artifacts/`` path is at a key known to read or to write;
* ``make`` runs the same commands as the headers, and only ``make ship`` writes a shipped file;
* each ``experiments/<ds>/detector.yaml`` holds the operating point's four keys with valid values;
* no YAML holds an absolute machine path.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
COMMON = ["experiments/common/trainer.yaml", "experiments/common/loggers.yaml"]
DATASETS = sorted(p.name for p in EXPERIMENTS.iterdir() if p.is_dir() and p.name != "common")
LIGHTNING = ("fit", "validate", "test", "predict")
# files under experiments/<ds>/ that are not Lightning stages
NOT_LIGHTNING = {"detector.yaml": "operating point", "saec.yaml": "mixdefense saec"}
# candidate operating points beside detector.yaml: detector_<name>.yaml (the tools' --config)
OPERATING_POINTS = sorted(p.relative_to(ROOT).as_posix() for ds in DATASETS for p in (EXPERIMENTS / ds).glob("detector*.yaml"))
STAGES = sorted(p.relative_to(ROOT).as_posix() for ds in DATASETS for p in (EXPERIMENTS / ds).glob("*.yaml")
                if p.name not in NOT_LIGHTNING and not p.name.startswith("detector_"))

# Keys whose artifacts/ paths are read (a shipped artifacts/<ds>/ file is right there) and keys that write
# (candidates only).  A new key holding an artifacts/ path must be added to one of them.
READ_KEYS = re.compile(r"^(model\.init_args\.(bundle|binding_classifier|init_weights|cgan|classifier|baselines\.\w+)"
                       r"|evaluation\.classifier)$")
WRITE_KEYS = re.compile(r"^(trainer\.callbacks\[\d+\]\.init_args\.path|output\.layer)$")


def header(path: str | Path) -> list[str]:
    """The leading comment lines of a YAML file."""
    lines = []
    for line in (ROOT / path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def header_commands(path: str | Path) -> list[list[str]]:
    """The ``mixdefense ...`` commands stated in a file's header, as argument lists (without ``mixdefense``)."""
    out = []
    for line in header(path):
        m = re.match(r"^#\s+mixdefense\s+(.*)$", line)
        if m:
            out.append(shlex.split(m.group(1)))
    return out


def config_files(argv: list[str]) -> list[str]:
    return [b for a, b in zip(argv, argv[1:]) if a == "--config"]


def run_command(stage: str) -> list[str]:
    """The header command that runs ``stage`` (a Lightning subcommand whose last --config is the stage file)."""
    for argv in header_commands(stage):
        if argv[0] in LIGHTNING and config_files(argv)[-1:] == [stage]:
            return argv
    raise AssertionError(f"{stage}: its header states no `mixdefense fit|test ... --config {stage}` command")


def flatten(value, prefix: str = ""):
    """``(dotted key, leaf value)`` pairs of a nested dict/list (list items as ``key[i]``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


@pytest.fixture(scope="module")
def parse():
    """``parse(config files) -> dict``: the LightningCLI parser of ``mixdefense fit|test`` (subclass mode, OmegaConf
    parser mode, as in mixdefense.cli.run_lightning_cli), built once; configs parsed and validated, nothing built."""
    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    import datamodules  # noqa: F401  (their class paths resolve by short name)
    import lightning_modules  # noqa: F401

    class ParseOnly(LightningCLI):
        def _set_seed(self):
            pass

        def instantiate_classes(self):
            pass

    def args(files):
        return [a for f in files for a in ("--config", str(ROOT / f))]

    with patch.object(sys, "argv", ["mixdefense"]):  # LightningCLI warns when it sees pytest's argv beside args
        cli = ParseOnly(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        parser_kwargs={"parser_mode": "omegaconf", "allow_abbrev": False, "exit_on_error": False},
                        save_config_callback=None, run=False, args=args(config_files(run_command(STAGES[0]))))

    parsed: dict[tuple[str, ...], dict] = {}

    def parse_files(files: list[str]) -> dict:
        if tuple(files) not in parsed:
            try:
                cfg = cli.parser.parse_args(args(files))
            except (Exception, SystemExit) as err:  # jsonargparse says why; keep the files in the message
                raise AssertionError(f"{' + '.join(files)} does not parse: {err}") from None
            parsed[tuple(files)] = cfg.as_dict()
        return copy.deepcopy(parsed[tuple(files)])

    return parse_files


def test_every_stage_header_states_its_command():
    assert STAGES, "no stage files under experiments/<ds>/"
    for stage in STAGES:
        argv = run_command(stage)
        files = config_files(argv)
        assert files[:2] == COMMON, f"{stage}: its command must start with {COMMON}, got {files}"
        for f in files:
            assert (ROOT / f).is_file(), f"{stage}: its header names a missing config {f}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_composes_and_parses(parse, stage):
    argv = run_command(stage)
    cfg = parse(config_files(argv))
    trainer = cfg["trainer"]
    ds = stage.split("/")[1]
    assert cfg["seed_everything"] == 0
    root_dir = trainer["default_root_dir"]
    assert root_dir.startswith("runs/"), f"{stage}: default_root_dir {root_dir} outside runs/"
    loggers = trainer["logger"]
    assert loggers and loggers[0]["class_path"].endswith("CSVLogger"), f"{stage}: the first logger must be CSV"
    for logger in loggers:  # the ${trainer.default_root_dir} interpolation resolved inside the stage file
        assert logger["init_args"]["save_dir"] == root_dir, f"{stage}: a logger's save_dir is not {root_dir}"
        if logger["class_path"].endswith("WandbLogger"):
            assert logger["init_args"]["group"] == ds and logger["init_args"]["project"] == "mixdefense"
    for callback in trainer.get("callbacks") or []:
        path = (callback.get("init_args") or {}).get("path")
        if path is not None:
            assert path.startswith(f"artifacts/candidates/{ds}/"), f"{stage}: {callback['class_path']} writes {path}"


def test_run_names_differ_per_stage(parse):
    seen: dict[tuple[str, str], str] = {}
    for stage in STAGES:
        cfg = parse(config_files(run_command(stage)))
        for logger in cfg["trainer"]["logger"]:
            args = logger["init_args"]
            key = (logger["class_path"], args["save_dir"] + "|" + str(args.get("name")))
            assert key not in seen, f"{stage} and {seen[key]} log to the same run {key}"
            seen[key] = stage


def test_demo_logs_to_csv_only_into_runs(parse):
    """`make demo`: the quick MNIST evaluation, CSV only (no W&B), report and examples under runs/demo/mnist/."""
    cfg = parse(config_files(run_command("experiments/mnist/demo.yaml")))
    assert config_files(run_command("experiments/mnist/demo.yaml"))[-2] == "experiments/mnist/evaluate_quick.yaml"
    assert [lg["class_path"] for lg in cfg["trainer"]["logger"]] == ["pytorch_lightning.loggers.CSVLogger"]
    assert cfg["model"]["init_args"]["report_dir"] == "runs/demo/mnist"
    assert cfg["model"]["init_args"]["examples"] == 10


def _artifact_paths(cfg: dict):
    for key, value in flatten(cfg):
        if isinstance(value, str) and value.startswith("artifacts/"):
            yield key, value


def test_artifact_paths_read_shipped_and_write_candidates(parse):
    from omegaconf import OmegaConf

    configs = {stage: parse(config_files(run_command(stage))) for stage in STAGES}
    for ds in DATASETS:  # the SAEC tool's config (OmegaConf, ${dataset} interpolation)
        saec = EXPERIMENTS / ds / "saec.yaml"
        if saec.is_file():
            configs[saec.relative_to(ROOT).as_posix()] = OmegaConf.to_container(OmegaConf.load(saec), resolve=True)
    assert any("saec" in k for k in configs)
    for name, cfg in configs.items():
        ds = name.split("/")[1]
        for key, path in _artifact_paths(cfg):
            if WRITE_KEYS.match(key):
                assert path.startswith(f"artifacts/candidates/{ds}/"), f"{name}: {key} writes {path}, not a candidate"
            else:
                assert READ_KEYS.match(key), f"{name}: {key} = {path}: add the key to READ_KEYS or WRITE_KEYS"


def test_saec_headers_state_their_commands():
    for ds in DATASETS:
        saec = f"experiments/{ds}/saec.yaml"
        if not (ROOT / saec).is_file():
            continue
        stated = {tuple(argv) for argv in header_commands(saec)}
        for action in ("calibrate", "evaluate"):
            assert ("saec", action, "--config", saec) in stated, f"{saec}: no `mixdefense saec {action} --config {saec}`"


def test_saec_header_commands_parse_with_their_overrides():
    """Every ``mixdefense saec`` command a header states (overrides after ``--config`` included) parses as stated."""
    from mixdefense.commands.saec import parse_args

    seen = 0
    for ds in DATASETS:
        saec = EXPERIMENTS / ds / "saec.yaml"
        if not saec.is_file():
            continue
        for line in header(saec):
            m = re.search(r"mixdefense (saec .*)$", line)
            if m:
                argv = shlex.split(m.group(1))[1:]
                args = parse_args(argv)
                assert args.config == argv[argv.index("--config") + 1]
                assert args.overrides == [a for a in argv if "=" in a], line
                seen += bool(args.overrides)
    assert seen, "no header states a saec command with overrides"


@pytest.mark.parametrize("path", OPERATING_POINTS)
def test_detector_yaml_operating_point(path):
    from mixdefense.commands import operating_point
    from mixdefense.splits import CALIBRATION_SPLITS

    ds = Path(path).parent.name
    path = ROOT / path
    op = yaml.safe_load(path.read_text())
    assert set(op) == {"calibration_split", "target_frr", "report_frrs", "calibration_images"}, path
    assert op["calibration_split"] in CALIBRATION_SPLITS
    assert {k: v for k, v in operating_point(ds, path).items() if k != "source"} == op  # the tools read it as written
    for rate in (op["target_frr"], *op["report_frrs"]):
        assert isinstance(rate, float) and 0.0 < rate < 1.0, f"{path}: {rate!r}"
    assert op["target_frr"] in op["report_frrs"], f"{path}: the shipped operating point is one of the reported ones"
    # the sweep reports at the operating point's rates: evaluate.yaml for detector.yaml, or the evaluate overlay
    # that names a candidate operating point's file (its sweep), else evaluate.yaml
    overlays = [f for f in sorted((EXPERIMENTS / ds).glob("evaluate_*.yaml")) if path.name in f.read_text()]
    sweep_file = overlays[0] if path.name != "detector.yaml" and overlays else EXPERIMENTS / ds / "evaluate.yaml"
    sweep = yaml.safe_load(sweep_file.read_text())["model"]["init_args"]
    assert sweep["frrs"] == op["report_frrs"], f"{sweep_file.name} frrs differ from {path.name} report_frrs"
    assert isinstance(op["calibration_images"], int) and not isinstance(op["calibration_images"], bool)
    assert op["calibration_images"] > 0
    for line in path.read_text().splitlines():
        if re.match(r"^\w+:", line):
            assert "#" in line, f"{path}: every key has its one-line comment: {line!r}"


ABSOLUTE = re.compile(r"(?:^|[\s\"'=(,\[{])(?:/(?:home|Users|root|work|tmp|mnt|scratch|data|opt|srv|var|private)/"
                      r"|~/|[A-Za-z]:[\\/])")


def test_no_absolute_machine_paths():
    files = sorted(EXPERIMENTS.rglob("*.yaml"))
    assert files
    for path in files:
        text = path.read_text()
        for n, line in enumerate(text.splitlines(), 1):
            assert not ABSOLUTE.search(line), f"{path.relative_to(ROOT)}:{n}: absolute path: {line.strip()}"
        for key, value in flatten(yaml.safe_load(text) or {}):
            if isinstance(value, str):
                assert not (value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", value)), \
                    f"{path.relative_to(ROOT)}: {key} = {value!r} is an absolute path"


# --- the Makefile runs the headers' commands -------------------------------------------------------------------------

def make_n(*args: str) -> list[list[str]]:
    """The mixdefense commands ``make -n <args>`` would run, as argument lists (without the mixdefense binary)."""
    out = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"make -n {' '.join(args)}: {out.stderr}"
    commands = []
    for line in out.stdout.replace("\\\n", " ").splitlines():
        words = shlex.split(line) if "mixdefense" in line else []
        if words and words[0].endswith("/mixdefense"):
            commands.append(words[1:])
    return commands


MAKE_STAGES = [  # (make arguments, the stage file whose header command the first mixdefense command must be)
    (["train-classifier"], "classifier"), (["train-classifier", "PROFILE=paper"], "classifier_paper"),
    (["train-cgan"], "cgan"), (["train-cgan", "PROFILE=paper"], "cgan_paper"),
    (["train-metric"], "metric"), (["train-metric", "PROFILE=paper"], "metric_paper"),
    (["train-madry"], "madry"), (["train-madry", "PROFILE=paper"], "madry_paper"),
    (["train-magnet"], "magnet"), (["evaluate"], "evaluate"), (["evaluate", "PROFILE=quick"], "evaluate_quick"),
    (["compare"], "compare"),
]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("ds", DATASETS)
def test_make_runs_the_header_commands(ds):
    for make_args, stage in MAKE_STAGES:
        path = f"experiments/{ds}/{stage}.yaml"
        ran = make_n(*make_args, f"DATASET={ds}")
        stated = header_commands(path)
        assert ran, f"make {' '.join(make_args)} DATASET={ds} runs no mixdefense command"
        assert ran[0] == run_command(path), f"make {' '.join(make_args)} DATASET={ds}: {ran[0]} is not {path}'s header command"
        for argv in ran[1:]:  # the follow-up commands (test, cgan/contranet evaluate, baselines) are stated too
            assert argv in stated, f"make {' '.join(make_args)} DATASET={ds} runs `mixdefense {shlex.join(argv)}`, " \
                                   f"which {path}'s header does not state"
    saec = f"experiments/{ds}/saec.yaml"
    assert make_n("saec", f"DATASET={ds}") == [argv for argv in header_commands(saec) if argv[0] == "saec"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_variants_runs_the_header_command_where_a_variants_file_exists():
    found = [ds for ds in DATASETS if (EXPERIMENTS / ds / "variants.yaml").is_file()]
    assert {"mnist", "gtsrb"} <= set(found)
    for ds in found:
        assert make_n("variants", f"DATASET={ds}") == [run_command(f"experiments/{ds}/variants.yaml")]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_demo_runs_the_demo_header_command():
    assert make_n("demo") == [run_command("experiments/mnist/demo.yaml")]


WRITE_FLAGS = ("--out", "--bundle", "--out-parts")


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("ds", DATASETS)
def test_make_writes_only_candidates_except_ship(ds):
    targets = ["train-classifier", "train-cgan", "evaluate-cgan", "train-metric", "evaluate-contranet", "calibrate",
               "bundle", "evaluate", "saec", "train-madry", "train-magnet", "baselines", "compare", "adaptive", "demo"]
    for target in targets:
        for argv in make_n(target, f"DATASET={ds}"):
            for flag, value in zip(argv, argv[1:]):
                if flag in WRITE_FLAGS and value.startswith("artifacts/"):
                    assert value.startswith(f"artifacts/candidates/{ds}"), f"make {target}: {flag} {value}"
    bundles = make_n("ship", f"DATASET={ds}")
    assert bundles == [["bundle", "--dataset", ds, "--out", f"artifacts/{ds}/detector.pt"]]
    assert make_n("bundle", f"DATASET={ds}") == [["bundle", "--dataset", ds, "--out", f"artifacts/candidates/{ds}/detector.pt"]]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_help_lists_every_target():
    text = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*?)(?<!\\)\n", text, re.S | re.M).group(1).replace("\\\n", " ").split()
    targets = set(re.findall(r"^([a-z][\w-]*):(?!=)", text, re.M))
    assert targets <= set(phony) | {"help"}, f"targets missing from .PHONY: {targets - set(phony)}"
    out = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    listed = set(re.findall(r"^make ([a-z][\w-]*)", out.stdout, re.M))
    assert targets - {"help"} <= listed, f"`make help` misses {sorted(targets - {'help'} - listed)}"
    assert listed <= targets, f"`make help` lists unknown targets {sorted(listed - targets)}"


def test_print_config_through_the_real_cli():
    """One end-to-end check of the installed entry point on the demo's four configs (the in-process parser above
    mirrors it): LightningCLI resolves them, CSV logger only."""
    argv = run_command("experiments/mnist/demo.yaml")
    out = subprocess.run([sys.executable, "-c", "import sys; from mixdefense.cli import main; sys.exit(main())",
                          *argv, "--print_config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = yaml.safe_load(out.stdout)
    assert [lg["class_path"] for lg in cfg["trainer"]["logger"]] == ["pytorch_lightning.loggers.CSVLogger"]
    assert cfg["trainer"]["logger"][0]["init_args"]["save_dir"] == "runs/demo/mnist"
    assert cfg["model"]["init_args"]["bundle"] == "artifacts/mnist/detector.pt"
