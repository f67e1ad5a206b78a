# mailbag: `make run` starts the appliance, `make test` runs the test suite.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CTL    := $(VENV)/bin/supervisorctl -c supervisord.conf
PIDFILE := var/supervisord.pid

# The mailbag config both programs read: `make run` exports it to supervisord, whose
# children inherit it. Only `run` exports it (the tests choose their own configs).
MAILBAG_CONFIG ?= $(CURDIR)/mailbag.toml
run: export MAILBAG_CONFIG := $(abspath $(MAILBAG_CONFIG))

.PHONY: venv run stop status test lint install-sendmail

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check shared services tests bench tools

# Start the appliance as a daemon (idempotent), wait for the receiver's 220, say where things are.
run: venv
	@mkdir -p var/log
	@if $(CTL) pid >/dev/null 2>&1; then \
		echo "supervisord is already running (pid $$($(CTL) pid)); starting any stopped program"; \
		$(CTL) start all >/dev/null 2>&1 || true; \
	else \
		echo "starting supervisord (MAILBAG_CONFIG=$(MAILBAG_CONFIG))"; \
		$(VENV)/bin/supervisord -c supervisord.conf || exit 1; \
	fi
	@$(PY) tools/ready.py

# Shut supervisord and both programs down; wait (bounded) until supervisord is gone.
stop:
	@if ! $(CTL) pid >/dev/null 2>&1; then echo "mailbag is not running"; exit 0; fi; \
	pid=$$(cat $(PIDFILE) 2>/dev/null); \
	$(CTL) shutdown; \
	for i in $$(seq 1 300); do \
		if [ -z "$$pid" ] || ! kill -0 "$$pid" 2>/dev/null; then echo "mailbag stopped"; exit 0; fi; \
		sleep 0.1; \
	done; \
	echo "supervisord (pid $$pid) is still running after 30 s" >&2; exit 1

status:
	@if $(CTL) pid >/dev/null 2>&1; then $(CTL) status || true; \
	else echo "mailbag is not running (make run starts it)"; fi

# Make mailbag-sendmail the machine's sendmail and mailq: symlinks $(PREFIX)/sbin/sendmail
# and $(PREFIX)/bin/mailq into .venv. Another MTA's files there are refused unless FORCE=1
# (then kept as <name>.before-mailbag). DESTDIR installs under another root folder.
PREFIX ?= /usr
install-sendmail: venv
	@$(PY) tools/install_sendmail.py --target "$(CURDIR)/$(VENV)/bin/mailbag-sendmail" \
		--root "$(DESTDIR)" --prefix "$(PREFIX)" $(if $(filter 1 yes true,$(FORCE)),--force)
