# Quick start: `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.napari-amasam-installed
# Debian packages napari needs for an OpenGL context under a virtual X display.
XLIBS := xvfb xauth libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
	libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xinput0 libxcb-xfixes0 \
	libxcb-shape0 libxcb-cursor0 libgl1 libegl1 libfontconfig1 libdbus-1-3
# Run under a virtual display when there is no screen.
RUN_X := $(if $(DISPLAY),,xvfb-run -a -s "-screen 0 1600x1000x24")

.PHONY: setup xlibs test test-fast demo napari benchmark lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch and torchvision are installed first and pinned together: segment_anything imports
# torchvision, whose compiled operators must match the torch build exactly. These two
# releases are a matching pair (and the ones this project's machines hold locally).
# The wsi and bioimageio extras come too, so that the whole suite runs (no test skips them).
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[testing,wsi,bioimageio]"
	touch $(STAMP)

xlibs:
	@if ! command -v xvfb-run >/dev/null 2>&1 || ! ldconfig -p | grep -q libxcb-cursor; then \
		if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
			echo "Installing Xvfb and the Qt xcb libraries (apt-get)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(XLIBS) >/dev/null; \
		else \
			echo "Xvfb / Qt xcb libraries missing: install them ($(XLIBS))"; \
		fi; \
	fi

setup: $(STAMP) xlibs

test: setup
	NAPARI_AMASAM_NOTHREADS=1 $(RUN_X) $(VENV)/bin/pytest -v -p no:cacheprovider tests

# The suite without the slow and gui markers, for quick iterations.
test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow and not gui" tests

demo: setup
	$(PY) resources/demo/run_demo.py --out demo_output

napari: setup
	$(VENV)/bin/napari --with napari-amasam

benchmark: setup
	$(PY) benchmarks/bench_encoder.py

# ruff is a developer tool, not a test dependency: installed here on first use.
lint: setup
	@$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q ruff
	$(PY) -m ruff check src tests

clean:
	rm -rf $(VENV) demo_output build dist src/*.egg-info
