# Set-up is part of every target: a missing .venv is created first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TINY := $(abspath ../shared/data/tiny-imagenet-200)

.PHONY: test demo demo-offline bench bench-quick clean

$(BIN)/oneshot-bench: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

test: $(BIN)/oneshot-bench
	$(BIN)/python -m pytest

# The main job, as a user online would run it: CIFAR-100 and ImageNet weights (downloaded,
# checksums verified). Offline, the first line of the error says how to run on local data.
demo: $(BIN)/oneshot-bench
	$(BIN)/oneshot-bench run --dataset cifar100 --download --weights imagenet --split ratio:0.8 \
		--n-way 5,10,20 --n-shot 1,5 --seed-protocol --name cifar100-imagenet

# The offline main job on the local Tiny-ImageNet stand-in at 32x32 (about 28 min on the
# 2-core Xeon with AMX here, 22 of them training the trunk; longer on CPUs without bf16).
demo-offline: $(BIN)/oneshot-bench
	$(BIN)/oneshot-bench run --dataset folder:$(TINY) --image-size 32 --weights none --stem nomaxpool \
		--train-from all --objective classes --epochs 40 --patience 40 --lr 0.1 --weight-decay 4e-3 \
		--precision bf16 --augment --tta flip-shift --split ratio:0.8 --seed 0 \
		--n-way 5,10,20 --n-shot 1,5 --seed-protocol --out-dir cache/runs/tiny32-classes

bench-quick: $(BIN)/oneshot-bench
	for b in encode_speed finetune_speed head_speed episodes_speed finetune_accuracy; do \
		$(BIN)/python benchmarks/$$b.py --quick --out benchmarks/results/$$b.quick.json || exit 1; done

bench: $(BIN)/oneshot-bench
	for b in encode_speed finetune_speed head_speed episodes_speed; do \
		$(BIN)/python benchmarks/$$b.py --out benchmarks/results/$$b.json || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
