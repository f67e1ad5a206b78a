# mailbag: `make run` starts the appliance, `make test` runs the test suite,
# `make install-service` installs it as a systemd service (README "Running as a service").
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CTL    := $(VENV)/bin/supervisorctl -c supervisord.conf
PIDFILE := var/supervisord.pid

# The mailbag config both programs read: `make run` exports it to supervisord, whose
# children inherit it; `make install-service` writes it into the unit. Only these two
# export it (the tests choose their own configs).
MAILBAG_CONFIG ?= $(CURDIR)/mailbag.toml
run install-service: export MAILBAG_CONFIG := $(abspath $(MAILBAG_CONFIG))

.PHONY: venv run stop status reload test lint install-service install-service-as install-sendmail

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	touch $(STAMP)

# One worker per core and one more: the end-to-end tests mostly wait on sockets and
# processes, and the extra worker fills that time. --dist loadfile keeps each file's
# tests in one worker (some share a user or a mount by name).
# Bytecode first: every end-to-end test starts programs, and where
# PYTHONDONTWRITEBYTECODE is set each start would compile the sources again.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))

test: venv
	$(PY) -m compileall -q shared services tools tests >/dev/null
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: venv
	$(VENV)/bin/ruff check shared services tests bench tools

# Start the appliance as a daemon (idempotent), wait for the receiver's 220, say where things are.
run: venv
	@mkdir -p var/log
	@if $(CTL) pid >/dev/null 2>&1; then \
		$(PY) tools/ready.py --same-config || exit 1; \
		echo "supervisord is already running (pid $$($(CTL) pid)); starting any stopped program"; \
		$(CTL) start all >/dev/null 2>&1 || true; \
	else \
		as=""; user=""; \
		if [ "$$(id -u)" = 0 ]; then user=$$($(PY) tools/service_user.py); fi; \
		if [ -n "$$user" ]; then \
			echo "started as root: supervisord and both programs run as $$user ([service] user)"; \
			chown -R "$$user:" var || exit 1; \
			as="-u $$user"; \
		fi; \
		echo "starting supervisord (MAILBAG_CONFIG=$(MAILBAG_CONFIG))"; \
		$(VENV)/bin/supervisord -c supervisord.conf $$as || exit 1; \
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

# Both programs re-read the config and the files it names (HUP); each logs `reload ok`,
# or one line naming the problem and keeps the config it had (var/log/mailbag.log).
reload:
	@if ! $(CTL) pid >/dev/null 2>&1; then echo "mailbag is not running (make run starts it)"; exit 1; fi; \
	$(CTL) signal HUP receiver sender

# Install mailbag as a systemd service running as an unprivileged user: [service] user
# of the config, else `mailbag` (or SERVICE_USER=name). Idempotent: run it again after
# every `git pull`. The commands it runs are printed (README "Running as a service").
SERVICE_USER ?=
UNIT_DIR ?= /etc/systemd/system

install-service: venv
	@$(MAKE) --no-print-directory install-service-as \
		SERVICE_USER="$(or $(SERVICE_USER),$$($(PY) tools/service_user.py mailbag))"

# The steps, for one SERVICE_USER. The checkout path goes into the unit as it is, so
# it may hold only characters systemd and sed take literally.
install-service-as:
	@for path in "$(CURDIR)" "$(abspath $(MAILBAG_CONFIG))"; do \
		case "$$path" in *[!A-Za-z0-9/._+-]*) \
			echo "install-service: $$path: use a path of letters, digits and ./_+-" >&2; \
			exit 1;; esac; \
		case "$$path/" in /home/*|/root/*|/run/user/*) \
			echo "install-service: $$path is hidden from the service (ProtectHome):" \
				"put it elsewhere, e.g. /opt/mailbag" >&2; exit 1;; esac; \
	done
	getent passwd $(SERVICE_USER) >/dev/null || useradd --system --user-group \
		--home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin $(SERVICE_USER)
	mkdir -p var/log
	chown -R $(SERVICE_USER): var
	$(PY) -m compileall -q shared services
	@runuser -u $(SERVICE_USER) -- $(PY) -c 'import services.receiver.app, services.sender.app' \
		|| { echo "install-service: $(SERVICE_USER) cannot run this checkout: it needs read" \
			"access to it and to the Python of $(VENV)" >&2; exit 1; }
	sed -e 's|/opt/mailbag|$(CURDIR)|g' \
		-e 's|^User=.*|User=$(SERVICE_USER)|' \
		-e "s|^Group=.*|Group=$$(id -gn $(SERVICE_USER))|" \
		-e 's|^Environment=MAILBAG_CONFIG=.*|Environment=MAILBAG_CONFIG=$(abspath $(MAILBAG_CONFIG))|' \
		contrib/systemd/mailbag.service > $(UNIT_DIR)/.mailbag.service.new
	chmod 644 $(UNIT_DIR)/.mailbag.service.new
	mv $(UNIT_DIR)/.mailbag.service.new $(UNIT_DIR)/mailbag.service
	@if [ -d /run/systemd/system ]; then echo "systemctl daemon-reload"; systemctl daemon-reload; \
	else echo "(systemd is not running here: no daemon-reload)"; fi

# Make mailbag-sendmail the machine's sendmail and mailq: symlinks $(PREFIX)/sbin/sendmail
# and $(PREFIX)/bin/mailq into .venv. Another MTA's files there are refused unless FORCE=1
# (then kept as <name>.before-mailbag). DESTDIR installs under another root folder.
PREFIX ?= /usr
install-sendmail: venv
	@$(PY) tools/install_sendmail.py --target "$(CURDIR)/$(VENV)/bin/mailbag-sendmail" \
		--root "$(DESTDIR)" --prefix "$(PREFIX)" $(if $(filter 1 yes true,$(FORCE)),--force)
