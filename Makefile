# zprovd: `make run` and `make test` do all the set-up on a fresh Debian machine.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ZPROVD := $(VENV)/bin/zprovd
DEV    := etc/dev.toml
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# command the test suite drives -> Debian package that provides it
PEERS := curl:curl tftp:tftp-hpa atftp:atftp busybox:busybox udhcpc:udhcpc \
         dhclient:isc-dhcp-client openssl:openssl ip:iproute2 \
         systemd-analyze:systemd

.PHONY: run test peers bench fuzz clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("zprovd needs Python 3.11 or newer") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Demo data for `make run`: one Zoiper user and one Yealink desk phone.
var/zprovd.sqlite3: | $(VENV)/.installed
	mkdir -p var
	$(ZPROVD) -c $(DEV) user add demo --password demo-password --display-name "Demo User" \
	    --sip-user 100 --sip-password demo-sip-secret
	$(ZPROVD) -c $(DEV) device add 00:15:65:12:34:56 --model yealink-t48g --user demo

run: $(VENV)/.installed var/zprovd.sqlite3
	@echo
	@echo "zprovd on loopback; try, in another terminal:"
	@echo "  curl 'http://127.0.0.1:8080/zoiper?user=demo&password=demo-password&version=1.14'"
	@echo "  curl -k 'https://127.0.0.1:8443/zoiper?user=demo&password=demo-password'"
	@echo "  curl -A 'Yealink SIP-T48G 35.83.0.35 00:15:65:12:34:56' http://127.0.0.1:8080/y000000000035.cfg"
	@echo "  curl http://127.0.0.1:8080/001565123456.cfg"
	@echo "  tftp 127.0.0.1 6969 -c get 001565123456.cfg /dev/stdout"
	@echo "Ctrl-C stops it."
	@echo
	$(ZPROVD) -c $(DEV) run

# The real peers the suite drives, installed with apt-get only when missing.
peers:
	@missing=""; for pair in $(PEERS); do \
	    command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "installing test peers:$$missing"; \
	    $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: $(VENV)/.installed peers
	$(PY) -m pytest -q

# Benchmarks against nginx, tftpd-hpa, atftpd and dnsmasq (bench/README.md);
# not part of `make test`.  Installs its own tools; needs root.
bench: $(VENV)/.installed
	$(SUDO) $(PY) bench/run.py $(BENCH_ARGS)     # make bench BENCH_ARGS=--quick: about 3 minutes

# Bounded fuzzing of the parsers (fuzz/README.md): atheris if it installs, else hypothesis.
FUZZ_SECONDS ?= 180
fuzz: $(VENV)/.installed
	$(PY) -m pip install --quiet --prefer-binary atheris || echo "atheris did not install: fuzzing with hypothesis instead"
	$(PY) fuzz/run.py --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .hypothesis
