# Palisade: the two commands of the README, plus the pieces they are made of.
#   make run   - create .venv, install, start the gateway on the bundled default config
#   make test  - install what the tests need (pip and Debian packages), lint, types, whole suite
#   make install   - the program in a venv at PREFIX, then `palisade install-system` (README,
#                    "Installing on a server"); make uninstall removes the program and the unit

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APT_PACKAGES := swaks openssl slapd ldap-utils spamassassin spamd clamav-daemon clamav rspamd fail2ban \
  logrotate systemd dovecot-core dovecot-imapd postfix nftables iproute2 chromium redis-server \
  redis-sentinel redis-tools gcc unbound
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# make install: the service's venv, made with Debian's python3 (an interpreter under a home
# directory, like pyenv's, may not be readable by the palisade user the daemon drops to).
PREFIX ?= /opt/palisade
SYSTEM_PYTHON ?= /usr/bin/python3

.PHONY: run test check lint types imports pytest system-deps bench clean install uninstall

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed: installing Debian's python3-venv"; \
	  $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv && \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[fast]'
	@touch $@

$(VENV)/.test-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[fast,test,stats]'
	@touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	@echo
	@echo "Palisade is starting on 127.0.0.1:2525 (bundled default config: domain example.test,"
	@echo "Maildir under ./var/mail, logs under ./var/log). In another terminal, send a message:"
	@echo
	@echo "  swaks --server 127.0.0.1:2525 --from you@outside.test --to postmaster@example.test"
	@echo
	@printf '%s\n' "  python3 -c 'import smtplib; smtplib.SMTP(\"127.0.0.1\", 2525).sendmail(\"you@outside.test\","
	@printf '%s\n' "             [\"postmaster@example.test\"], \"Subject: hi\\r\\n\\r\\nhello\\r\\n\")'"
	@echo
	@echo "then look in ./var/mail/postmaster/new/ and ./var/log/mainlog. Stop with Ctrl-C."
	@echo
	$(BIN)/palisade serve

install:
	@[ "$$(id -u)" = 0 ] || { echo "make install: run it as root (it creates a user and /etc/palisade)"; exit 1; }
	@[ -x $(PREFIX)/bin/python ] || { echo "creating the venv $(PREFIX) with $(SYSTEM_PYTHON)"; \
	  $(SYSTEM_PYTHON) -m venv $(PREFIX); }
	$(PREFIX)/bin/pip install -q '.[fast]'
	$(PREFIX)/bin/palisade install-system --prefix $(PREFIX) --source $(CURDIR)

uninstall:
	@[ "$$(id -u)" = 0 ] || { echo "make uninstall: run it as root"; exit 1; }
	PYTHONPATH=$(CURDIR)/src $(SYSTEM_PYTHON) -S -m palisade.cli.install uninstall-system --prefix $(PREFIX)

system-deps:
	@missing=""; for pkg in $(APT_PACKAGES); do \
	  [ "$$(dpkg-query -W -f='$${db:Status-Status}' $$pkg 2>/dev/null)" = installed ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing (their system services are not started:"; \
	  echo "the tests start private instances on loopback)"; \
	  made=""; if [ ! -e /usr/sbin/policy-rc.d ]; then made=1; \
	    printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; \
	    $(SUDO) chmod +x /usr/sbin/policy-rc.d; fi; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  rc=$$?; [ -z "$$made" ] || $(SUDO) rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	fi

lint: $(VENV)/.test-installed
	$(BIN)/ruff format --check src tests bench loopback
	$(BIN)/ruff check src tests bench loopback

types: $(VENV)/.test-installed
	$(BIN)/mypy

imports: $(VENV)/.test-installed
	$(BIN)/lint-imports

check: lint types imports

pytest: $(VENV)/.test-installed system-deps
	$(BIN)/pytest

test: system-deps check pytest

bench: $(VENV)/.test-installed
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var build src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
