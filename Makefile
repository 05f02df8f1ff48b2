# Skin-lesion classifier on TorchServe. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/ham10000-224
# The same lesions at their true 4:3 shape (all 10,015 images): how requests are shaped.
DATA_43 ?= ../shared/data/ham10000-200x150
OOD ?= ../shared/data/ood-imagenet/images
CLINICAL ?= ../shared/data/pad-ufes-20-clinical
SAMPLES_DIR ?= ../shared/data/samples-600x450
RUN_DIR ?= run
RUN ?= runs/train
IMAGE ?= ../shared/data/samples-600x450/ISIC_0024354.jpg
IMAGES ?= $(DATA)/images
LABELS ?= $(DATA)/metadata.csv
OUT ?= runs/eval
OUT_EXPLAIN ?= runs/explain
OUT_EXPLANATIONS ?= runs/explanations
EXPLANATIONS_ARGS ?=
TARGET ?=
VERSION ?=
CHECKPOINT ?=
BENCH_ARGS ?=
BASELINE ?=
SOAK_ARGS ?=
TRAIN_ARGS ?=
EVAL_ARGS ?=
CALIBRATE_ARGS ?=
MEMBERS ?=
STORAGE ?= float16
PYTEST_ARGS ?=
DEMO_ARGS ?=
REPLICAS ?= 3
ARCHIVE ?= model_store/skin_lesion.mar
CLUSTER_DIR ?= $(RUN_DIR)/cluster
# Cross-fitting and distillation (make train-folds, make distill): docs/EXPERIMENTS.md, "Cross-fitting and distillation: how to run".
K ?= 5
DEVICE ?= auto
ARCH ?=
EPOCHS ?=
FOLDS_DATA ?= ../shared/data/ham10000-200x150
FOLDS_ARGS ?=
# The fold networks' input, height x width: the photo's 4:3 shape at 224x224's pixel count (docs/EXPERIMENTS.md, "Third try").
FOLDS_SIZE ?= 192x256
DISTILL_ARGS ?=

.PHONY: evaluate-explanations train-bench train-student compare-releases fit-gate evaluate-ood help install java train compare ensemble calibrate evaluate archive serve stop status release rollout rollback predict explain bench soak demo test clean kserve-bundle cluster-up cluster-down cluster-rollout

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

# requirements-demo.txt goes in with --no-deps: gradio declares pillow<13, so that file pins
# gradio's whole dependency closure itself, next to the project's pillow pin.
# The project itself goes in editable (pyproject.toml) so that scripts, tests, the demo and the
# notebook import handler/, lab/ and ops/ as packages, without any sys.path edits.
$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-demo.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-demo.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed java ## Virtual environment with pinned packages, plus Java 17

java: ## Install Java 17 (TorchServe's frontend) if no Java 17+ is on PATH
	@if java -version 2>&1 | grep -qE 'version "(1[7-9]|2[0-9])'; then \
	  echo "java: $$(java -version 2>&1 | head -1)"; \
	else \
	  echo "installing Java 17 (needs root and apt)"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openjdk-17-jre-headless; \
	fi

train: install ## Fine-tune on $(DATA) into $(RUN) (resumable: rerun to continue)
	$(PY) scripts/train.py --metadata $(DATA)/metadata.csv --images $(DATA)/images --output $(RUN) $(TRAIN_ARGS)

train-folds: install ## Cross-fitted training over the training lesions of $(FOLDS_DATA) (the validation split's lesions left out): K lesion-grouped folds, one network per fold, out-of-fold predictions (resumable: rerun to continue): make train-folds K=5 [DEVICE=cuda] [ARCH=...] [EPOCHS=...] [FOLDS_ARGS=...]
	nice -n 10 $(PY) scripts/train_folds.py --k $(K) --metadata $(FOLDS_DATA)/metadata.csv --images $(FOLDS_DATA)/images \
	  --output runs/folds_k$(K) --device $(DEVICE) $(if $(ARCH),--arch $(ARCH)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
	  --image-size $(word 1,$(subst x, ,$(FOLDS_SIZE))) --image-width $(word 2,$(subst x, ,$(FOLDS_SIZE))) \
	  --provenance-dir models/provenance $(FOLDS_ARGS)

distill: install ## Distil the fold teachers of train-folds into one student, runs/distill_k$(K)/student.pt, with an out-of-fold check (resumable): make distill K=5 [DEVICE=cuda] [ARCH=student] [EPOCHS=...] [VERSION=x.y] [DISTILL_ARGS=...]
	nice -n 10 $(PY) scripts/distill.py --k $(K) --metadata $(FOLDS_DATA)/metadata.csv --images $(FOLDS_DATA)/images \
	  --teachers runs/folds_k$(K) --output runs/distill_k$(K) --device $(DEVICE) $(if $(ARCH),--arch $(ARCH)) \
	  $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(VERSION),--model-version $(VERSION)) --provenance-dir models/provenance $(DISTILL_ARGS)

train-bench: install ## Training images/s of each CPU lever on this machine (geometry, channels_last, bf16, frozen stages, torch.compile, 1-thread processes); run it idle [TRAIN_BENCH_ARGS=--steps 5]
	$(PY) scripts/train_bench.py --out runs/train-bench.json $(TRAIN_BENCH_ARGS)

# The 4:3 student recipe (docs/EXPERIMENTS.md, "Third try"): one Lite2 at a 4:3 shape, warm-started from release
# 1.6.1's best member (E, its fourth network: --init-member 3; a Lite2), stem + 4 stages frozen, distilled from 1.6.1
# (its logits cached once in the run folder). Each training lesion's sharp 224x224 copy comes first (resized whole to
# 4:3 it is the photo's shape again, and the teacher sees it as it was trained), the lesion's other images as their
# softer 200x150 copies. Validated on every image of the validation lesions. Resumable per epoch: rerun to continue.
# STUDENT_SIZE=192x256 is the third try; 150x200 (HAM10000's own 200x150 size) was the second (0.663 balanced accuracy
# on the sharp 4:3 copies against 1.6.1's 0.743: too few pixels for what the sharp copies show).
# The teacher is release 1.6.1 exactly as committed (its file's SHA-256 names the logit cache).
TEACHER_COMMIT ?= 82ad431
TEACHER ?= runs/release-1.6.1/skin_lesion.pt
STUDENT_SIZE ?= 192x256
STUDENT_EPOCHS ?= 5
STUDENT_RUN ?= runs/student-lite2-$(STUDENT_SIZE)
# What the student distils: 1.6.1's logits of each training image (the default; 1.6.1 trained on these images, so its
# logits describe its fit), or out-of-fold logits from a fold run that left the validation lesions out:
# STUDENT_TEACHER="--teacher-out-of-fold models/provenance/folds_k4/out_of_fold_logits.csv".
STUDENT_TEACHER ?= --teacher $(TEACHER)
runs/release-1.6.1/skin_lesion.pt:
	mkdir -p $(@D) && git show $(TEACHER_COMMIT):models/skin_lesion.pt > $@.tmp && mv $@.tmp $@
train-student: install $(TEACHER) ## Train the 4:3 student for 1.7.0: one Lite2 at STUDENT_SIZE (192x256), warm-started from and distilled by 1.6.1, into runs/student-lite2-STUDENT_SIZE (resumable) [TRAIN_ARGS=...]
	nice -n 10 $(PY) scripts/train.py --metadata $(DATA_43)/metadata.csv --images $(DATA)/images $(DATA_43)/images \
	  --output $(STUDENT_RUN) --val-split models/provenance/val_split.json \
	  --arch efficientnet_lite2 --image-size $(word 1,$(subst x, ,$(STUDENT_SIZE))) --image-width $(word 2,$(subst x, ,$(STUDENT_SIZE))) --resize-mode full_view \
	  --init-checkpoint $(TEACHER) --init-member 3 --freeze-blocks 4 \
	  $(STUDENT_TEACHER) --distill-alpha 0.5 --distill-temperature 2.0 \
	  --epochs $(STUDENT_EPOCHS) --patience $(STUDENT_EPOCHS) --lr 3e-4 --batch-size 32 --ema-decay 0.995 --class-weight-power 1.0 --min-crop-scale 0.6 \
	  --workers 1 --threads 2 --model-version 1.7.0-student $(TRAIN_ARGS)

compare-releases: install ## Releases side by side on the validation lesions at 4:3 (stretched 224 copies and 200x150 copies), lesion-level with intervals, and each minus the first with paired intervals: make compare-releases RELEASES="1.6.1=a.pt 1.7.0=b.pt"
	$(PY) scripts/compare_releases.py $(foreach release,$(RELEASES),--release $(release)) --out runs/compare-releases

compare: install ## Every combination of MEMBERS as a calibrated ensemble, out of fold on the validation split: make compare MEMBERS="a.pt b.pt" (report: runs/members.json)
	$(PY) scripts/compare_members.py --members $(MEMBERS) --images $(DATA)/images --labels $(DATA)/metadata.csv \
	  --subset models/provenance/val_split.json --cache-dir runs/logits --report runs/members.json $(COMPARE_ARGS)

ensemble: install ## Average trained checkpoints into $(or $(CHECKPOINT),runs/ensemble.pt), then calibrate it: make ensemble MEMBERS="a.pt b.pt" VERSION=x.y [STORAGE=int8]
	$(PY) scripts/ensemble.py --members $(MEMBERS) --output $(or $(CHECKPOINT),runs/ensemble.pt) --model-version $(VERSION) --storage-dtype $(STORAGE)
	$(MAKE) calibrate CHECKPOINT=$(or $(CHECKPOINT),runs/ensemble.pt)

evaluate: install ## Evaluate like the service answers: make evaluate IMAGES=dir LABELS=csv OUT=dir [CHECKPOINT=file] [EVAL_ARGS=...]
	$(PY) scripts/evaluate.py --images $(IMAGES) --labels $(LABELS) --out $(OUT) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(EVAL_ARGS)

evaluate-ood: install ## Input gate refusal rates with 95 % intervals: everyday photos (OOD=dir), synthetic frames, clinical photos (CLINICAL=dir, with the forced answers' balanced accuracy), dermoscopy falsely refused at 4:3 and full size [CHECKPOINT=file]
	$(PY) scripts/evaluate.py --images $(DATA_43)/images --labels $(DATA_43)/metadata.csv --subset models/provenance/val_split.json \
	  --out $(OUT)-ood --bootstrap 0 --ood $(OOD) --synthetic 300 --clinical $(CLINICAL) --samples $(SAMPLES_DIR) \
	  $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(EVAL_ARGS)

calibrate: install ## Refit calibrations and the referral operating point of $(or $(CHECKPOINT),models/skin_lesion.pt) on the validation split (report: models/provenance/calibration.json, or CHECKPOINT's name + -calibration.json)
	$(PY) scripts/calibrate.py --checkpoint $(or $(CHECKPOINT),models/skin_lesion.pt) --output $(or $(CHECKPOINT),models/skin_lesion.pt) \
	  --images $(DATA)/images --labels $(DATA)/metadata.csv --subset models/provenance/val_split.json \
	  --report $(if $(CHECKPOINT),$(basename $(CHECKPOINT))-calibration.json,models/provenance/calibration.json) $(CALIBRATE_ARGS)

fit-gate: install ## Fit and measure the input gate (distance and modality head), store it in $(or $(CHECKPOINT),models/skin_lesion.pt) (report: docs/ood_gate_report.json) [VERSION=x.y]
	nice -n 10 $(PY) -m scripts.fit_input_gate --checkpoint $(or $(CHECKPOINT),models/skin_lesion.pt) \
	  --write-into $(or $(CHECKPOINT),models/skin_lesion.pt) $(if $(VERSION),--model-version $(VERSION)) \
	  --output runs/ood/input_gate.pt --report docs/ood_gate_report.json --histogram docs/ood_gate_histogram.png

model_store/skin_lesion.mar: models/skin_lesion.pt config/model-config.yaml $(wildcard handler/*.py) ops/archive.py scripts/package.py | $(VENV)/.installed
	$(PY) scripts/package.py

archive: install model_store/skin_lesion.mar ## Build model_store/skin_lesion.mar

serve: install model_store/skin_lesion.mar ## Start TorchServe on 127.0.0.1 (with the rolled-out default and its predecessor, if any) and wait until READY
	$(PY) scripts/serve.py start --run-dir $(RUN_DIR)

stop: ## Stop the TorchServe started by `make serve`
	@if [ -x $(PY) ]; then $(PY) scripts/serve.py stop --run-dir $(RUN_DIR); else echo "nothing installed, nothing to stop"; fi

status: ## Versions, default version, workers and health of the running server
	$(PY) scripts/rollout.py status --run-dir $(RUN_DIR)

release: install ## Archive model_store/skin_lesion_vVERSION.mar: make release VERSION=x.y [CHECKPOINT=...]
	$(PY) scripts/rollout.py release --version "$(VERSION)" $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

rollout: ## Register VERSION next to the default, smoke-test it, make it the default, unload older ones: make rollout VERSION=x.y
	$(PY) scripts/rollout.py rollout --run-dir $(RUN_DIR) --version "$(VERSION)"

rollback: ## Make the previous default the default again
	$(PY) scripts/rollout.py rollback --run-dir $(RUN_DIR)

predict: ## Send one image to the running server: make predict IMAGE=path.jpg
	$(PY) scripts/serve.py predict --run-dir $(RUN_DIR) --image $(IMAGE)

evaluate-explanations: install ## Score the served Grad-CAM and the candidate maps on the validation lesions' masks (pointing game, mass in lesion, deletion/insertion, top-20 % vs random, randomization sanity, cost), table + figure into OUT_EXPLANATIONS [CHECKPOINT=file] [EXPLANATIONS_ARGS="--all" or "--lesions N"]
	nice -n 10 $(PY) scripts/evaluate_explanations.py --data $(DATA_43) --split models/provenance/val_split.json \
	  --out $(OUT_EXPLANATIONS) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(EXPLANATIONS_ARGS)

explain: install ## Grad-CAM panels for IMAGE (space-separated list) into OUT_EXPLAIN, answered as the service answers [TARGET=mel] [CHECKPOINT=file]
	$(PY) scripts/explain.py $(IMAGE) --out $(OUT_EXPLAIN) $(if $(TARGET),--target-class $(TARGET)) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

bench: install ## Benchmarks through real TorchServe (concurrency sweep, in-process limit, unbatched, Grad-CAM) into runs/bench and docs/PERFORMANCE.md [BENCH_ARGS=--quick] [BASELINE=old.pt or git:REV, e.g. git:360bf4d = release 1.5.0]
	$(PY) scripts/bench.py $(if $(BASELINE),--baseline $(BASELINE)) $(BENCH_ARGS)

soak: install model_store/skin_lesion.mar ## 10-minute soak at 80 % of measured peak (uses the running server, or starts one)
	$(PY) scripts/soak.py --run-dir $(RUN_DIR) $(SOAK_ARGS)

demo: install model_store/skin_lesion.mar ## Gradio demo on http://127.0.0.1:7860 (uses the running server, or starts one) [DEMO_ARGS="--local" or "--share --auth @FILE"]
	$(PY) app.py --run-dir $(RUN_DIR) $(DEMO_ARGS)

kserve-bundle: install model_store/skin_lesion.mar ## KServe storage layout (config/config.properties + model-store/skin_lesion.mar) in runs/kserve-bundle [ARCHIVE=model_store/skin_lesion_vX.mar]
	$(PY) scripts/kserve_bundle.py --archive $(ARCHIVE) --out runs/kserve-bundle

cluster-up: install model_store/skin_lesion.mar ## REPLICAS TorchServe replicas behind HAProxy on 127.0.0.1:8090, one bearer token (run/cluster/cluster.json) [REPLICAS=3]
	$(PY) scripts/cluster.py up --cluster-dir $(CLUSTER_DIR) --replicas $(REPLICAS)

cluster-down: ## Stop the replicas, HAProxy and the supervisor started by `make cluster-up`, by pid
	@if [ -x $(PY) ]; then $(PY) scripts/cluster.py down --cluster-dir $(CLUSTER_DIR); else echo "nothing installed, nothing to stop"; fi

cluster-rollout: ## Roll VERSION out replica by replica with the rollout smoke gate; a failure leaves every replica on the old one: make cluster-rollout VERSION=x.y
	$(PY) scripts/cluster.py rollout --cluster-dir $(CLUSTER_DIR) --version "$(VERSION)"

test: install ## Unit and integration tests (real TorchServe on free 127.0.0.1 ports)
	$(PY) -m pytest $(PYTEST_ARGS)

clean: stop
	rm -rf model_store/*.mar $(RUN_DIR) .pytest_cache
