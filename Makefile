# Everything runs as root on Debian 12: `make demo`, `make test`, `make bench`.
PYTHON ?= /usr/bin/python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: deps worker-user demo lint-imports test unit bench reliability deb deb-synlb clean

# The system user the NFQUEUE workers run as ([synlb] worker_user, default
# _synlb; docs/HARDENING.md): made once, like the Debian package's postinst
# does. Every target that runs synlb needs it, so each one checks it.
WORKER_USER := _synlb

$(STAMP): pyproject.toml lab/pyproject.toml packaging/apt-deps.txt
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    $$(grep -v '^#' packaging/apt-deps.txt) \
	  || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    $$(grep -v '^#' packaging/apt-deps.txt); }
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	$(VENV)/bin/pip install -q -e ./lab
	touch $(STAMP)

worker-user:
	@getent passwd $(WORKER_USER) >/dev/null || useradd --system --no-create-home --home-dir /nonexistent \
	    --shell /usr/sbin/nologin --user-group $(WORKER_USER) \
	  || { echo "make: cannot create the system user $(WORKER_USER), whom synlb's workers run as: run make deps as root" >&2; exit 1; }

deps: $(STAMP) worker-user

demo: $(STAMP) worker-user
	$(VENV)/bin/synlb-lab demo

# the layers of plugin/synlb (pyproject.toml [tool.importlinter]) first
lint-imports: $(STAMP) worker-user
	$(VENV)/bin/lint-imports --no-cache --no-logo

test: lint-imports
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=15

unit: lint-imports
	$(VENV)/bin/pytest -q -p no:cacheprovider -m 'not lab'

bench: $(STAMP) worker-user
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(VENV)/bin/synlb-lab bench

# The Debian packages synlb and python3-netfilterqueue (Debian 12 has none),
# built with dpkg-buildpackage from a copy of the tree, checked by lintian:
# into $(DIST)/. SYNLB_DEB_VERSION=V builds synlb as Debian version V.
DIST ?= dist

deb: $(STAMP)
	packaging/build-packages $(DIST) synlb python-netfilterqueue

deb-synlb: $(STAMP)
	packaging/build-packages $(DIST) synlb

# every fault, load and bad-input scenario in the lab (well under 15 minutes):
# writes docs/RELIABILITY.md and bench/results/reliability.json
reliability: $(STAMP) worker-user
	$(VENV)/bin/python -m synlb_lab.reliability

clean:
	rm -rf $(VENV) build dist *.egg-info plugin/*.egg-info lab/*.egg-info
