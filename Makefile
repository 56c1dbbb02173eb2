# shifter-slurm: build, install, local test cluster, tests and benchmarks.
#   make demo     install everything, start the local cluster, run the README's job
#   make test     the whole test suite on a fresh local cluster (what .ci/run runs)
# Run as root on Debian 12.  See README.md.

PREFIX     ?= /opt/shifter-slurm
SYSCONFDIR ?= $(PREFIX)/etc
STATE_DIR  ?= /var/lib/shifter-cluster
NODES      ?= 2
VENV       ?= .venv
BASE_PYTHON := /usr/bin/python3

PYTHON  := $(VENV)/bin/python
CLUSTER := $(PYTHON) -m localcluster --prefix $(PREFIX) --sysconfdir $(SYSCONFDIR) --state-dir $(STATE_DIR)
PLUGIN_SRC := spank_plugin/shifter_spank.c
PLUGIN     := build/shifter_spank.so
LAUNCHER_SRC := shifter/launch/fastlaunch.c
LAUNCHER     := build/shifter
# The installed paths are compiled into the plugin and the launcher: another PREFIX or SYSCONFDIR rebuilds them.
PREFIX_STAMP := build/.prefix$(subst /,_,$(PREFIX))$(subst /,_,$(SYSCONFDIR))
CFLAGS_HARDENED := -O2 -Wall -Wextra -Werror -D_FORTIFY_SOURCE=2 -fstack-protector-strong
CFLAGS_PLUGIN := -shared -fPIC $(CFLAGS_HARDENED) -Wno-unused-parameter -I/usr/include/slurm \
                 -DSHIFTER_HOOK=\"$(PREFIX)/libexec/shifter/spank-hook\"
CFLAGS_LAUNCHER := $(CFLAGS_HARDENED) -fPIE -pie -Wl,-z,relro,-z,now \
                   -DSHIFTER_CONFIG_FILE=\"$(SYSCONFDIR)/udiRoot.conf\" \
                   -DSHIFTER_PYTHON_LAUNCHER=\"$(PREFIX)/libexec/shifter/shifter\"

export PREFIX SYSCONFDIR NODES STATE_DIR VENV

.PHONY: all deps venv plugin launcher install udiimage cluster-up cluster-down cluster-env cluster-status \
        debian-image demo test bench lint clean

all: plugin launcher

## deps: the Debian packages of scripts/apt-packages.txt (quick no-op when installed)
deps:
	@scripts/deps.sh

## venv: the development virtualenv (this package editable, pytest, ruff) used by the cluster tools
venv: $(VENV)/bin/pytest

$(VENV)/bin/pytest: pyproject.toml
	@test -x $(PYTHON) || $(BASE_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -e '.[test]'
	@touch $@

## plugin: the SPANK shim, with the installed hook's path compiled in
plugin: $(PLUGIN)

$(PLUGIN): $(PLUGIN_SRC) Makefile $(PREFIX_STAMP)
	gcc $(CFLAGS_PLUGIN) $(PLUGIN_SRC) -o $@

## launcher: bin/shifter, the interpreter-free front of the Python launcher (shifter/formats/launchplan.py)
launcher: $(LAUNCHER)

$(LAUNCHER): $(LAUNCHER_SRC) Makefile $(PREFIX_STAMP)
	gcc $(CFLAGS_LAUNCHER) $(LAUNCHER_SRC) -o $@

$(PREFIX_STAMP):
	@mkdir -p build && rm -f build/.prefix_* && touch $@

$(PLUGIN_SRC):
	@echo "make: $(PLUGIN_SRC) does not exist yet: nothing to build" >&2; exit 1

## install: the layout of docs/internals.md under PREFIX (venv, wrappers, plugin, buildinfo)
install: $(if $(wildcard $(PLUGIN_SRC)),$(PLUGIN)) $(LAUNCHER)
	$(BASE_PYTHON) scripts/install.py --prefix $(PREFIX) --sysconfdir $(SYSCONFDIR) --plugin $(PLUGIN) \
	    --launcher $(LAUNCHER)

## udiimage: the in-container sshd (the host's OpenSSH made relocatable) for optUdiImage
UDIIMAGE := $(PREFIX)/libexec/shifter/opt/udiImage
udiimage: $(UDIIMAGE)/sbin/sshd

$(UDIIMAGE)/sbin/sshd: shifter/packing/relocate.py shifter/packing/packtool.py | venv
	mkdir -p $(PREFIX)/libexec/shifter/opt
	$(PYTHON) -m shifter.packtool udiimage --force $(UDIIMAGE)

## cluster-up / cluster-down / cluster-env / cluster-status: the local cluster (NODES=2 by default)
cluster-up: venv
	$(CLUSTER) up --nodes $(NODES)

cluster-down: venv
	$(CLUSTER) down

cluster-env: venv
	@$(CLUSTER) env

cluster-status: venv
	@$(CLUSTER) status

## debian-image: debootstrap the demo/debian:bookworm image once (cached), push it if the registry is up
debian-image: venv
	$(CLUSTER) debian-image

## demo: everything from scratch, then the README's two-node job as the test user
demo: deps venv install udiimage
	$(CLUSTER) up --nodes $(NODES)
	$(PYTHON) -m localcluster.demo --state-dir $(STATE_DIR)

## test: the whole suite against the cluster (Debian image, 2 fake GPUs per node); always takes it down and checks nothing is left
test: deps venv install udiimage
	FAKE_GPUS=2 DEBIAN_IMAGE=1 scripts/with-cluster.sh $(PYTHON) -m pytest -q tests

## bench: benchmarks on an 8-node cluster with the Debian image and fake GPUs; writes bench/results.json
bench: deps venv install udiimage
	NODES=8 FAKE_GPUS=2 DEBIAN_IMAGE=1 scripts/with-cluster.sh $(PYTHON) bench/run.py

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf build
