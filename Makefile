# MixDefense — one way in.  `make demo` and `make test` install what they need by themselves.
#   make train-classifier DATASET=mnist|cifar10|gtsrb [PROFILE=cpu|paper] [ARGS="--trainer.max_epochs=3"]
# Every target runs `mixdefense ...` exactly as the header of the experiments/<ds>/<stage>.yaml it uses states
# (Lightning stages: experiments/common/trainer.yaml and loggers.yaml first, then the stage file), so the
# command called directly gives what make gives.  Trained and calibrated parts go to artifacts/candidates/<ds>/;
# only `make ship` writes a shipped file (artifacts/<ds>/detector.pt).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MD := $(VENV)/bin/mixdefense
DATASET ?= mnist
PROFILE ?= cpu
# extra options for the target's main mixdefense command (train-*: the Lightning fit/test, not the follow-up
# evaluation; calibrate: the bundle; saec: key=value overrides of both steps)
ARGS ?=
export MIXDEFENSE_DATA ?= $(CURDIR)/data
SHARED_DATA ?= $(CURDIR)/../shared/data
STAMP := $(VENV)/.installed
# The shared blocks of every Lightning stage: trainer defaults, then the CSV + W&B loggers (experiments/common/).
COMMON := --config experiments/common/trainer.yaml --config experiments/common/loggers.yaml
EXP := experiments/$(DATASET)
CANDIDATES := artifacts/candidates/$(DATASET)

ifeq ($(PROFILE),paper)
  SUFFIX := _paper
else ifeq ($(PROFILE),quick)
  SUFFIX := _quick
else ifeq ($(PROFILE),long)
  SUFFIX := _long
else
  SUFFIX :=
endif

# The operating point (where calibration images come from, ContraNet's and the baselines' clean false-rejection
# rates) is experiments/$(DATASET)/detector.yaml, which the tools read by themselves.
ifneq ($(filter command line,$(origin CALIBRATION_SPLIT) $(origin CONTRANET_FRR)),)
  $(error CALIBRATION_SPLIT / CONTRANET_FRR are gone: the operating point is experiments/$(DATASET)/detector.yaml (edit it, or ARGS="--config <file>" for bundle/calibrate/baselines, ARGS="--calibration-split val|test_calibration" for one run))
endif

# Inputs of the evaluations of single parts (shipped by default; train-cgan / train-metric pass their candidate).
CGAN ?= artifacts/$(DATASET)/cgan$(SUFFIX).pt
CGAN_OUT ?= results/$(DATASET)/cgan$(SUFFIX)
METRIC ?= artifacts/$(DATASET)/metric$(SUFFIX).pt
CONTRANET_OUT ?= results/$(DATASET)/contranet$(SUFFIX)
EVAL_ARGS ?=
ADAPTIVE_ARGS ?=

.PHONY: help install data test test-slow demo train-classifier train-cgan evaluate-cgan train-metric evaluate-contranet \
	calibrate bundle ship evaluate saec adaptive train-madry train-magnet baselines compare variants results-index clean-runs

help:
	@echo "make demo                          the main job (installs, fetches data, runs): the shipped MNIST detector against"
	@echo "                                   FGSM, PGD and C&W (experiments/mnist/evaluate_quick.yaml + demo.yaml) -> runs/demo/mnist/"
	@echo "make test                          the fast test suite (installs what it needs)"
	@echo "make test-slow                     the slow tests (training, sweeps)"
	@echo "make install                       only the virtual environment $(VENV) with the package"
	@echo "make data                          only the datasets, materialised into \$$MIXDEFENSE_DATA"
	@echo "make train-classifier DATASET=ds   train + test the target classifier (PROFILE=cpu|paper)"
	@echo "make train-cgan DATASET=ds         train the revised cGAN (Algorithm 1), then evaluate-cgan on the new candidate (PROFILE=cpu|paper; cifar10: long)"
	@echo "make evaluate-cgan DATASET=ds      faithfulness (SSIM) and label binding of a cGAN (CGAN=path, default the shipped one), Figure-8 grid"
	@echo "make train-metric DATASET=ds       train ContraNet's metric model M, then evaluate-contranet with the new candidate M"
	@echo "make evaluate-contranet DATASET=ds calibrate ContraNet (M, L2, SSIM, M+SSIM; METRIC=/CGAN=path, default the shipped ones)"
	@echo "                                   and measure it against FGSM/PGD/C&W; writes artifacts/candidates/ds/contranet.pt"
	@echo "make calibrate DATASET=ds          calibrate SAEC (uniform noise), then bundle it with the shipped classifier and ContraNet"
	@echo "                                   (ContraNet recalibrated at experiments/ds/detector.yaml's operating point)"
	@echo "                                   -> the candidate artifacts/candidates/ds/detector.pt"
	@echo "make bundle DATASET=ds             one detector file from the shipped parts, calibrated and checked on clean images"
	@echo "                                   -> the candidate artifacts/candidates/ds/detector.pt"
	@echo "make ship DATASET=ds               the same bundle into the shipped artifacts/ds/detector.pt (explicit: DATASET is required;"
	@echo "                                   = mixdefense bundle --dataset ds --out artifacts/ds/detector.pt)"
	@echo "make evaluate DATASET=ds           attacks x budgets -> Acc_detector / Acc_RC curves (PROFILE=quick: 3 x 3)"
	@echo "make saec DATASET=ds               calibrate SAEC on uniform noise (-> artifacts/candidates/ds/saec.pt), then evaluate it against attacks"
	@echo "make train-madry DATASET=ds        baseline: Madry PGD adversarial training of the classifier (PROFILE=cpu|paper)"
	@echo "make train-magnet DATASET=ds       baseline: MagNet's autoencoder, then the baseline detectors calibrated with it"
	@echo "make baselines DATASET=ds          calibrate Feature Squeezing and MagNet (experiments/ds/detector.yaml: target_frr)"
	@echo "                                   -> artifacts/candidates/ds/"
	@echo "make compare DATASET=ds            MixDefense, Feature Squeezing, MagNet, Madry, undefended on the same curves"
	@echo "make variants DATASET=ds           the paper variant beside MixDefense+ (the shipped bundle) on the same AEs"
	@echo "                                   (experiments/ds/variants.yaml; mnist and gtsrb) -> results/experiments/ds/variants/"
	@echo "make adaptive DATASET=ds           the complete adaptive evaluation (untargeted + top-3 goals, L∞ + L2, oblivious /"
	@echo "                                   adaptive / Orthogonal / channel-tied / low-frequency PGD, Square, HopSkipJump)"
	@echo "                                   + robust-accuracy table (Tramèr ε/2) + paper §6; resumable (runs/ds/adaptive_partial)"
	@echo "make results-index                 results/INDEX.md from every results/**/run.json record"
	@echo "make clean-runs                    delete runs/, checkpoints/ and wandb/ (logs, checkpoints, the demo's report)"
	@echo "datasets: mnist cifar10 gtsrb; data root: \$$MIXDEFENSE_DATA (default ./data)"
	@echo "ARGS=\"...\": extra options for the target's main mixdefense command (train-*: the Lightning fit/test; calibrate: the bundle;"
	@echo "saec: key=value overrides); EVAL_ARGS / ADAPTIVE_ARGS: extra options for contranet evaluate / adaptive"
	@echo "(quick adaptive profile: ADAPTIVE_ARGS=\"--num-images 100 --steps 20 --restarts 1 --norms linf --targets untargeted"
	@echo " --attacks pgd adaptive orthogonal --out results/ds/adaptive_quick --partial-dir runs/ds/adaptive_quick_partial\")."
	@echo "Operating points: experiments/<ds>/detector.yaml.  Shipped files: artifacts/<ds>/; new ones: artifacts/candidates/<ds>/"
	@echo "(pass a candidate's path to use it, e.g. make evaluate-cgan CGAN=artifacts/candidates/ds/cgan.pt; the yaml headers say how)."

# A virtual environment with the package installed (editable) and its test extras; pip's own output goes to
# .venv/install.log (shown when the install fails).
$(STAMP): setup.cfg pyproject.toml
	@echo "creating the virtual environment $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@echo "installing PyTorch and the package into $(VENV) (first run only, ~2 min)"
	@$(PY) -m pip install --quiet --upgrade pip > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@$(PY) -m pip install --quiet -e '.[test]' >> $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@touch $@
	@echo "installed: $(MD)"

install: $(STAMP)

# On this project's machines the real datasets are in ../shared/data: materialise them into
# the data root.  Elsewhere, the datamodules download (download=true) or say what is missing.
data: $(STAMP)
	@if [ -f "$(SHARED_DATA)/materialize.py" ]; then \
		$(PY) "$(SHARED_DATA)/materialize.py" --to "$(MIXDEFENSE_DATA)"; \
	else \
		echo "no $(SHARED_DATA)/materialize.py: datasets download on first use (download=true), or put them under $(MIXDEFENSE_DATA)"; \
	fi

test: $(STAMP) data
	$(PY) -m pytest -q

test-slow: $(STAMP) data
	$(PY) -m pytest -q -m slow

train-classifier: $(STAMP) data
	$(MD) fit $(COMMON) --config $(EXP)/classifier$(SUFFIX).yaml $(ARGS)
	$(MD) test $(COMMON) --config $(EXP)/classifier$(SUFFIX).yaml $(ARGS) \
		--ckpt_path checkpoints/$(DATASET)/classifier$(SUFFIX)/best.ckpt

# Algorithm 1, then the evaluation of the candidate it exported (its report in runs/, so results/ keeps the
# shipped cGAN's); resume a killed run with ARGS="--ckpt_path checkpoints/$(DATASET)/cgan/last.ckpt".
train-cgan: $(STAMP) data
	$(MD) fit $(COMMON) --config $(EXP)/cgan$(SUFFIX).yaml $(ARGS)
	$(MAKE) evaluate-cgan DATASET=$(DATASET) ARGS= CGAN=$(CANDIDATES)/cgan$(SUFFIX).pt \
		CGAN_OUT=runs/$(DATASET)/cgan$(SUFFIX)/evaluation

evaluate-cgan: $(STAMP) data
	$(MD) cgan evaluate --dataset $(DATASET) --weights $(CGAN) --out $(CGAN_OUT) $(ARGS)

# ContraNet's metric model M on the frozen (shipped) cGAN, then the detector's calibration and evaluation with
# the candidate M (report in runs/).  The calibrated ContraNet always goes to the candidates.
train-metric: $(STAMP) data
	$(MD) fit $(COMMON) --config $(EXP)/metric$(SUFFIX).yaml $(ARGS)
	$(MAKE) evaluate-contranet DATASET=$(DATASET) ARGS= METRIC=$(CANDIDATES)/metric$(SUFFIX).pt \
		CONTRANET_OUT=runs/$(DATASET)/metric$(SUFFIX)/contranet

evaluate-contranet: $(STAMP) data
	$(MD) contranet evaluate --dataset $(DATASET) --cgan $(CGAN) --metric $(METRIC) \
		--bundle $(CANDIDATES)/contranet$(SUFFIX).pt --out $(CONTRANET_OUT) $(EVAL_ARGS) $(ARGS)

# The detector bundle from the shipped parts (artifacts/$(DATASET)/{classifier,saec,contranet}.pt), ContraNet
# calibrated at experiments/$(DATASET)/detector.yaml's operating point, checked on clean test images: a candidate.
# ARGS="--parts <folder>" bundles other parts, ARGS="--keep-thresholds" keeps contranet.pt's thresholds.
bundle: $(STAMP) data
	$(MD) bundle --dataset $(DATASET) --out $(CANDIDATES)/detector.pt $(ARGS)

# Shipping is explicit: the same bundle into artifacts/<ds>/detector.pt, only with DATASET named on the command line.
ship: $(STAMP) data
	@[ "$(origin DATASET)" = "command line" ] || { echo "make ship replaces the shipped artifacts/<ds>/detector.pt: name it, e.g. make ship DATASET=mnist"; exit 2; }
	$(MD) bundle --dataset $(DATASET) --out artifacts/$(DATASET)/detector.pt $(ARGS)

# Every threshold from clean data: SAEC on uniform-noise copies of training images (1 % clean rejection) into
# artifacts/candidates/$(DATASET)/saec.pt, then the candidate bundle of that SAEC with the shipped classifier and
# ContraNet (linked into runs/$(DATASET)/calibrate/parts), ContraNet recalibrated at detector.yaml's operating point.
CALIBRATE_PARTS := runs/$(DATASET)/calibrate/parts
calibrate: $(STAMP) data
	$(MD) saec calibrate --config $(EXP)/saec.yaml
	mkdir -p $(CALIBRATE_PARTS)
	ln -sfn $(CURDIR)/artifacts/$(DATASET)/classifier.pt $(CURDIR)/artifacts/$(DATASET)/contranet.pt \
		$(CURDIR)/$(CANDIDATES)/saec.pt $(CALIBRATE_PARTS)/
	$(MD) bundle --dataset $(DATASET) --parts $(CALIBRATE_PARTS) --out $(CANDIDATES)/detector.pt $(ARGS)

evaluate: $(STAMP) data
	$(MD) test $(COMMON) --config $(EXP)/evaluate$(SUFFIX).yaml $(ARGS)

# ARGS here: key=value overrides of saec.yaml for both steps (e.g. ARGS="calibration.num_images=2000").
saec: $(STAMP) data
	$(MD) saec calibrate --config $(EXP)/saec.yaml $(ARGS)
	$(MD) saec evaluate --config $(EXP)/saec.yaml $(ARGS)

# Baselines (issue 7): Madry adversarial training, MagNet's autoencoder, the calibrated detectors, and the
# comparison run (experiments/<ds>/compare.yaml = the evaluate sweep with the baselines beside MixDefense).
train-madry: $(STAMP) data
	$(MD) fit $(COMMON) --config $(EXP)/madry$(SUFFIX).yaml $(ARGS)
	$(MD) test $(COMMON) --config $(EXP)/madry$(SUFFIX).yaml $(ARGS) \
		--ckpt_path checkpoints/$(DATASET)/madry$(SUFFIX)/best.ckpt

# The candidate autoencoder, then the baselines calibrated with it and the shipped classifier (linked into
# runs/$(DATASET)/magnet/parts).
MAGNET_PARTS := runs/$(DATASET)/magnet/parts
train-magnet: $(STAMP) data
	$(MD) fit $(COMMON) --config $(EXP)/magnet.yaml $(ARGS)
	mkdir -p $(MAGNET_PARTS)
	ln -sfn $(CURDIR)/artifacts/$(DATASET)/classifier.pt $(CURDIR)/$(CANDIDATES)/magnet_ae.pt $(MAGNET_PARTS)/
	$(MAKE) baselines DATASET=$(DATASET) ARGS="--parts $(MAGNET_PARTS)"

# Feature Squeezing and MagNet from artifacts/$(DATASET)/{classifier,magnet_ae}.pt (ARGS="--parts <folder>": others),
# thresholds at detector.yaml's target_frr (correctly classified calibration images) -> the candidates artifacts/candidates/$(DATASET)/{feature_squeezing,magnet}.pt.
baselines: $(STAMP) data
	$(MD) baselines calibrate --dataset $(DATASET) --out-parts $(CANDIDATES) $(ARGS)

compare: $(STAMP) data
	$(MD) test $(COMMON) --config $(EXP)/evaluate.yaml --config $(EXP)/compare.yaml $(ARGS)

# Issue 23: the paper variant's bundle (a candidate; experiments/$(DATASET)/variants.yaml says how it is built) as a
# compared defense beside the shipped MixDefense+ on the evaluate sweep's AEs.
variants: $(STAMP) data
	@[ -f $(EXP)/variants.yaml ] || { echo "no $(EXP)/variants.yaml: $(DATASET)'s paper variant is not built yet (MODEL_CARD.md: variants)"; exit 2; }
	$(MD) test $(COMMON) --config $(EXP)/evaluate.yaml --config $(EXP)/variants.yaml $(ARGS)

# The complete adaptive evaluation -> results/$(DATASET)/adaptive/ (docs/adaptive.md): 500 images, 100 steps,
# 2 restarts; goals untargeted + topk:3; L∞ and L2 at the robustness sweep's budgets; oblivious / adaptive /
# Orthogonal / channel-tied / low-frequency PGD, Square, HopSkipJump; the robust-accuracy table
# (robust_accuracy.md, with Tramèr's ε/2 comparison) and the paper's §6 case studies.  Long: every finished row is
# kept in runs/$(DATASET)/adaptive_partial/ and a rerun resumes there.  Quick profile (its own folders):
# ADAPTIVE_ARGS="--num-images 100 --steps 20 --restarts 1 --norms linf --targets untargeted --attacks pgd adaptive
#   orthogonal --out results/$(DATASET)/adaptive_quick --partial-dir runs/$(DATASET)/adaptive_quick_partial";
# `mixdefense adaptive --help` lists every option.
adaptive: $(STAMP) data
	$(MD) adaptive --dataset $(DATASET) $(ADAPTIVE_ARGS) $(ARGS)

results-index: $(STAMP)
	$(MD) results-index $(ARGS)

# The main job: the shipped MNIST detector (SAEC + LeNet + ContraNet) against FGSM, PGD and C&W, three budgets
# each, on 500 test images; table on screen, figures and 10 example PNGs per attack in runs/demo/mnist/ (untracked).
demo: $(STAMP) data
	@test -f artifacts/mnist/detector.pt || { echo "artifacts/mnist/detector.pt (shipped) is missing: restore it from git, or rebuild it with make ship DATASET=mnist"; exit 1; }
	$(MD) test $(COMMON) --config experiments/mnist/evaluate_quick.yaml --config experiments/mnist/demo.yaml $(ARGS)

clean-runs:
	rm -rf runs checkpoints wandb
