"""mailbag's configuration: one TOML file, loaded and validated here and nowhere else.

Invariants this module guarantees to every caller:

- every key has a default, so an empty file is a valid configuration;
- an unknown section or key, a value of the wrong type or out of range raises
  `ConfigError` whose message is ONE line naming the key and the problem; an
  unknown key also names the closest known one (a misspelling) or the section
  it belongs in, so the programs' start-up errors and `mailbag check` say it;
- relative paths are resolved against the folder of the config file (SPEC §2), so
  the programs behave the same whatever their working directory is.

Which file: `--config FILE`, else the environment variable `MAILBAG_CONFIG`, else
`mailbag.toml` at the repository root (`resolve_config_path`).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.aliases import AliasError, AliasTable
from shared.smtp import PathSyntaxError, check_mailbox, idna_twin

ENV_VAR = "MAILBAG_CONFIG"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = REPO_ROOT / "mailbag.toml"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The longest time any key may say, in seconds (ten years). Every such value ends up
# in a wait (threading, sockets) or a time stamp, and those overflow at 2**63 ns
# (about 292 years) - a value past that would be accepted here and end the sender at
# its first wait; no mail setting needs more than years.
MAX_SECONDS = 10 * 365 * 86400.0


class ConfigError(Exception):
    """A configuration problem; str(err) is one line fit for the operator."""


@dataclass(frozen=True)
class HostPort:
    """A `host:port` pair; IPv6 literals are written `[::1]:2525`."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", text.strip())
        if not match:
            raise ValueError(f"expected host:port (or [ipv6]:port), got {text!r}")
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4))
        # Port 0 is bind(2)'s "any free port": a listener that no log line, `make run`
        # or scraper could name, a relay that cannot be reached.
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range (1-65535)")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# Marker types: a field annotated with one of these gets the matching conversion.
class OptionalPath(Path):
    """A path that may be empty ("" in TOML means: not set, None in Python)."""


class OptionalHostPort(HostPort):
    """A host:port that may be empty ("" means: not set, None in Python)."""


class RelayList(tuple):
    """`relay = "host:port"`, `relay = ["h1:587", "h2:587"]`, or "" (none): a tuple of
    HostPort in the order the relays are tried."""


@dataclass(frozen=True)
class RelayOptions:
    """`[sender.relays."host:port"]`: one relay's own TLS and AUTH settings; a key left
    out takes the `[sender]` key of the same name."""

    tls: str | None = None
    tls_verify: bool | None = None
    ca_file: OptionalPath | None = None
    username: str | None = None
    password_file: OptionalPath | None = None
    auth_without_tls: bool | None = None


@dataclass(frozen=True)
class RouteConfig:
    """One relay with the settings that apply to it (its own, else [sender]'s)."""

    address: HostPort
    tls: str
    tls_verify: bool
    ca_file: Path | None
    username: str
    password_file: Path | None
    auth_without_tls: bool


class RelayOptionsTable(dict):
    """`[sender.relays]`: RelayOptions by relay "host:port"."""


@dataclass(frozen=True)
class Rate:
    """`"14/s"`, `"100/min"`, `"500/h"`, `"2000/d"`: at most `count` per `seconds`."""

    count: int
    seconds: float

    _UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0,
              "d": 86400.0, "day": 86400.0}

    @classmethod
    def parse(cls, text: str) -> Rate:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*([a-z]+)\s*", text)
        if not match or match.group(2) not in cls._UNITS or int(match.group(1)) <= 0:
            raise ValueError(f"expected a rate like '14/s', '100/min' or '500/h', got {text!r}")
        return cls(int(match.group(1)), cls._UNITS[match.group(2)])

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "h", 86400.0: "d"}[self.seconds]
        return f"{self.count}/{unit}"


class OptionalDuration(float):
    """Seconds written as "30m", "4h", "2d" or a number; "" means: off (None)."""


class Duration(float):
    """Seconds written as "30m", "4h", "2d" or a number; always set."""


@dataclass(frozen=True)
class ReceiverConfig:
    listen: HostPort = HostPort("127.0.0.1", 2525)
    max_connections: int = 5
    max_message_bytes: int = 10 * 1024 * 1024
    idle_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7: at least 5 minutes
    relay_networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    max_recipients: int = 100  # RFC 5321 §4.5.3.1.8: at least 100
    max_connections_per_ip: int = 0  # 0 = only max_connections limits
    session_deadline: float = 1800.0  # total seconds a session may last
    max_bad_commands: int = 20  # unknown/invalid commands before 421
    max_hops: int = 50  # Received: fields a message may carry; more: 554 5.4.6 (a loop)
    tls_cert: OptionalPath | None = None
    tls_key: OptionalPath | None = None
    tls_listen: OptionalHostPort | None = None  # implicit TLS (port 465 style)
    users_file: OptionalPath | None = None
    require_auth: bool = False


@dataclass(frozen=True)
class QueueConfig:
    dir: Path = Path("var/queue")
    failed_dir: OptionalPath | None = None  # default: "failed" next to dir
    quarantine_dir: OptionalPath | None = None  # default: "quarantine" next to dir
    # Commit concurrent sessions' messages together with one syncfs (shared/queue.py
    # GroupCommit); false = each session fsyncs its own file (queue on a busy, shared
    # filesystem).
    group_commit: bool = True

    @property
    def failed(self) -> Path:
        return self.failed_dir or self.dir.parent / "failed"

    @property
    def quarantine(self) -> Path:
        return self.quarantine_dir or self.dir.parent / "quarantine"


TLS_MODES = ("none", "starttls", "tls")


@dataclass(frozen=True)
class SenderConfig:
    relay: RelayList = RelayList()  # in the order they are tried; () = no relay
    relays: RelayOptionsTable = field(default_factory=RelayOptionsTable)
    relay_retry: float = 60.0  # a failed relay is tried again after at most this long
    max_rate: str = ""  # messages handed to relays, e.g. "14/s"; "" = no limit
    poll_interval: float = 60.0
    tls: str = "none"
    tls_verify: bool = True
    ca_file: OptionalPath | None = None
    username: str = ""
    password_file: OptionalPath | None = None
    auth_without_tls: bool = False  # send the password over plain text: explicit opt-in only
    # RFC 5321 §4.5.3.2 timeouts, in seconds.
    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    command_timeout: float = 300.0
    data_init_timeout: float = 120.0
    data_block_timeout: float = 180.0
    data_end_timeout: float = 600.0
    retry_initial: float = 60.0  # first backoff; doubles on every further failure
    retry_max: float = 3600.0
    max_queue_lifetime: float = 5 * 24 * 3600.0
    messages_per_connection: int = 1000

    @property
    def rate(self) -> Rate | None:
        return Rate.parse(self.max_rate) if self.max_rate else None

    def routes(self) -> list[RouteConfig]:
        """Each relay with its settings: its own table's keys, else [sender]'s."""
        routes = []
        for address in self.relay:
            own = self.relays.get(str(address), RelayOptions())

            def pick(key: str, own: RelayOptions = own) -> typing.Any:
                value = getattr(own, key)
                return getattr(self, key) if value is None else value

            routes.append(RouteConfig(address, pick("tls"), pick("tls_verify"),
                                      pick("ca_file"), pick("username"),
                                      pick("password_file"), pick("auth_without_tls")))
        return routes


@dataclass(frozen=True)
class LocalConfig:
    domains: tuple[str, ...] = ("localhost",)
    maildir: Path = Path("var/mail")

    def __post_init__(self) -> None:
        # An internationalised domain is local in both IDNA forms (shared.smtp.idna_twin);
        # the configured ones come first, so the first is still the one bare names get.
        twins = (idna_twin(domain) for domain in self.domains)
        extra = tuple(dict.fromkeys(t for t in twins if t and t not in self.domains))
        object.__setattr__(self, "domains", self.domains + extra)


@dataclass(frozen=True)
class LogConfig:
    file: Path = Path("var/log/mailbag.log")
    level: str = "INFO"
    rotation: str = "10 MB"  # size at which the file is rotated; "" = never
    retention: int = 5  # rotated files kept (mailbag.log.1 ... .N)

    @property
    def rotation_bytes(self) -> int | None:
        return parse_size(self.rotation) if self.rotation else None


@dataclass(frozen=True)
class ServiceConfig:
    # The user supervisord switches to when `make run` starts it as root (its `-u`);
    # "": whoever starts it. The systemd unit runs as its own User= from the start.
    user: str = ""


@dataclass(frozen=True)
class RewriteConfig:
    """How relayed mail names its sender (services/sender/rewrite.py, SPEC §8)."""

    envelope_sender: str = ""  # forced MAIL FROM for every relayed message; "" = not forced
    # "root@localhost" = "alerts@example.com", "@localhost" = "@example.com"
    senders: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BounceConfig:
    """Delivery status notices (services/sender/bounce.py, SPEC §8)."""

    delay_warning: OptionalDuration | None = OptionalDuration(4 * 3600)  # "" = no warning


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (services/monitoring/, SPEC §9)."""

    listen: OptionalHostPort | None = None  # "" = no endpoint, nothing counted
    relay_down_after: Duration = Duration(600.0)  # /healthz: relay failing this long
    max_queue_age: Duration = Duration(3600.0)  # /healthz: oldest waiting message


@dataclass(frozen=True)
class DkimKeyConfig:
    """One signing key: mail whose From: is in `domain` is signed with it."""

    domain: str = ""
    selector: str = ""
    key_file: OptionalPath | None = None


@dataclass(frozen=True)
class DkimConfig:
    """DKIM signing of relayed mail (shared/dkim.py): one key here, more in [[dkim.keys]]."""

    domain: str = ""
    selector: str = ""
    key_file: OptionalPath | None = None
    keys: tuple[DkimKeyConfig, ...] = ()

    @property
    def all_keys(self) -> tuple[DkimKeyConfig, ...]:
        """Every configured key, the one in [dkim] itself first."""
        first = DkimKeyConfig(self.domain, self.selector, self.key_file)
        return ((first,) if self.domain else ()) + self.keys


@dataclass(frozen=True)
class Config:
    path: Path
    hostname: str = "mailbag.localdomain"
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    sender: SenderConfig = field(default_factory=SenderConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    bounce: BounceConfig = field(default_factory=BounceConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # [aliases]: local part (any case) -> its targets; shared/aliases.py resolves them
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def metrics_dir(self) -> Path:
        """Where the programs share their figures and liveness (shared/metrics/):
        `metrics` next to the queue folder, like `failed` and `quarantine`."""
        return self.queue.dir.parent / "metrics"


_SECTIONS: dict[str, type] = {
    "receiver": ReceiverConfig,
    "queue": QueueConfig,
    "sender": SenderConfig,
    "local": LocalConfig,
    "log": LogConfig,
    "service": ServiceConfig,
    "rewrite": RewriteConfig,
    "bounce": BounceConfig,
    "dkim": DkimConfig,
    "metrics": MetricsConfig,
}

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """'10 MB' -> 10_000_000; '512 KiB' -> 524288; '1000' -> 1000."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"expected a size like '10 MB', got {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[unit]


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int | float) -> float:
    """'30m' -> 1800.0; '4h' -> 14400.0; '2d' -> 172800.0; '90' or 90 -> 90.0 (seconds)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]?)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _DURATION_UNITS:
            raise ValueError(f"expected a duration like '30m', '4h', '2d' or seconds, got {text!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[unit]
    if not math.isfinite(seconds):  # TOML numbers may be nan or inf
        raise ValueError(f"expected a finite duration, got {text!r}")
    if seconds <= 0:
        raise ValueError(f"a duration must be greater than 0, got {text!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"a duration is at most 3650d (10 years), got {text!r}")
    return seconds


def resolve_config_path(cli_value: str | None) -> Path:
    """--config wins over MAILBAG_CONFIG, which wins over the repository default."""
    chosen = cli_value or os.environ.get(ENV_VAR) or str(DEFAULT_CONFIG_PATH)
    return Path(chosen).expanduser().resolve()


def load_config(path: Path) -> Config:
    """Read and validate `path`; raise ConfigError (one line) on any problem."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 (byte {err.start})") from None
    return parse_config(raw, path)


def parse_config(raw: dict[str, typing.Any], path: Path) -> Config:
    base = path.parent
    values: dict[str, typing.Any] = {"path": path}
    for key, value in raw.items():
        if key == "hostname":
            values["hostname"] = _convert(value, str, "hostname", base)
            if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", values["hostname"]):
                raise ConfigError(f"hostname: {values['hostname']!r} is not a host name")
        elif key == "aliases":
            values["aliases"] = _parse_aliases(value)
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            values[key] = _build_section(key, _SECTIONS[key], value, base)
        else:
            known = ["hostname", "aliases", *_SECTIONS]
            raise ConfigError(f"unknown key {key!r} at the top level of {path.name}"
                              + _suggestion(key, known, ""))
    for name, cls in _SECTIONS.items():
        values.setdefault(name, _build_section(name, cls, {}, base))
    config = Config(**values)
    _check_ranges(config)
    _check_mail_sections(config)
    return config


def _parse_aliases(raw: typing.Any) -> Mapping[str, tuple[str, ...]]:
    """[aliases]: each value a string or a list of strings (checked in _check_mail_sections)."""
    if not isinstance(raw, dict):
        raise ConfigError("[aliases] must be a table")
    table: dict[str, tuple[str, ...]] = {}
    for key, value in raw.items():
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"aliases.{key}: expected a string or a list of strings")
        table[key] = tuple(items)
    return types.MappingProxyType(table)


def _build_section(name: str, cls: type, raw: dict[str, typing.Any], base: Path) -> typing.Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, typing.Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown key {key!r} in [{name}]" + _suggestion(key, known, name))
        kwargs[key] = _convert(value, hints[key], f"{name}.{key}", base)
    # Defaults that are relative paths are relative to the config file too.
    for key, fld in known.items():
        if key not in kwargs and isinstance(fld.default, Path):
            kwargs[key] = _absolute(fld.default, base)
    return cls(**kwargs)


def _suggestion(key: str, known: typing.Iterable[str], section: str) -> str:
    """What the operator probably meant by an unknown key: the section it belongs in,
    or the closest known key of this section (difflib), or nothing."""
    homes = [name for name, cls in _SECTIONS.items()
             if name != section and key in {f.name for f in dataclasses.fields(cls)}]
    if homes:
        return f"; it belongs in [{homes[0]}]"
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _absolute(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _convert(value: typing.Any, annotation: typing.Any, key: str, base: Path) -> typing.Any:
    """Check `value` against the field's annotation and convert it; ConfigError if wrong."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        annotation = next(a for a in args if a is not type(None))
    try:
        if annotation is bool:
            return _expect(value, bool, key)
        if annotation is int:
            if isinstance(value, bool):
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            return _expect(value, int, key)
        if annotation is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{key}: expected a number, got {value!r}")
            if not math.isfinite(value):  # TOML has nan and inf; no timeout is either
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            if value > MAX_SECONDS:  # every float key is seconds
                raise ConfigError(f"{key}: at most {MAX_SECONDS:.0f} seconds (10 years), "
                                  f"got {value!r}")
            return float(value)
        if annotation is str:
            return _expect(value, str, key)
        if annotation is Path:
            return _absolute(Path(_expect(value, str, key)), base)
        if annotation is OptionalPath:
            text = _expect(value, str, key)
            return _absolute(Path(text), base) if text else None
        if annotation is HostPort:
            return HostPort.parse(_expect(value, str, key))
        if annotation is OptionalHostPort:
            text = _expect(value, str, key)
            return HostPort.parse(text) if text else None
        if annotation is RelayList:
            if isinstance(value, str):
                return RelayList((HostPort.parse(value),) if value else ())
            items = _expect(value, list, key)
            return RelayList(HostPort.parse(_expect(item, str, key)) for item in items)
        if annotation is RelayOptionsTable:
            table = _expect(value, dict, key)
            return RelayOptionsTable({
                str(HostPort.parse(name)): _build_section(f"{key}.{name!r}", RelayOptions,
                                                          _expect(options, dict, key), base)
                for name, options in table.items()})
        if annotation in (OptionalDuration, Duration):
            if value == "" and annotation is OptionalDuration:
                return None
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ConfigError(f"{key}: expected a duration like \"4h\", got {value!r}")
            return annotation(parse_duration(value))
        if annotation == Mapping[str, str]:
            table = _expect(value, dict, key)
            for name, item in table.items():
                _expect(item, str, f"{key}.{name}")
            return types.MappingProxyType(dict(table))
        if origin is tuple and len(args) == 2 and dataclasses.is_dataclass(args[0]):
            items = _expect(value, list, key)
            return tuple(_build_section(f"{key}[{i}]", args[0], _expect(item, dict, key), base)
                         for i, item in enumerate(items))
        if annotation == tuple[str, ...]:
            items = _expect(value, list, key)
            return tuple(_expect(item, str, key).lower() for item in items)
        if annotation == tuple[IPNetwork, ...]:
            items = _expect(value, list, key)
            return tuple(ipaddress.ip_network(_expect(i, str, key), strict=False) for i in items)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
    raise AssertionError(f"no conversion for {annotation!r}")  # a bug in this module


def _expect(value: typing.Any, kind: type, key: str) -> typing.Any:
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _check_relays(snd: SenderConfig) -> None:
    if snd.tls not in TLS_MODES:
        raise ConfigError(f"sender.tls: must be one of {', '.join(TLS_MODES)}, got {snd.tls!r}")
    if snd.username and not snd.password_file:
        raise ConfigError("sender.username is set but sender.password_file is not")
    listed = {str(address) for address in snd.relay}
    if len(listed) < len(snd.relay):
        raise ConfigError("sender.relay: a relay is listed twice")
    for name in snd.relays:
        if name not in listed:
            raise ConfigError(f"sender.relays: {name!r} is not one of sender.relay "
                              f"({', '.join(sorted(listed)) or 'none'})")
    for route in snd.routes():
        where = f"sender.relays.{str(route.address)!r}"
        if route.tls not in TLS_MODES:
            raise ConfigError(f"{where}.tls: must be one of {', '.join(TLS_MODES)}, "
                              f"got {route.tls!r}")
        if route.username and not route.password_file:
            raise ConfigError(f"{where}: a username but no password_file")
    try:
        snd.rate  # noqa: B018 - validates the rate text
    except ValueError as err:
        raise ConfigError(f"sender.max_rate: {err}") from None


def _check_ranges(config: Config) -> None:
    rcv, snd, log = config.receiver, config.sender, config.log
    positive = {
        "receiver.max_connections": rcv.max_connections,
        "receiver.max_message_bytes": rcv.max_message_bytes,
        "receiver.idle_timeout": rcv.idle_timeout,
        "receiver.max_recipients": rcv.max_recipients,
        "receiver.session_deadline": rcv.session_deadline,
        "receiver.max_bad_commands": rcv.max_bad_commands,
        "receiver.max_hops": rcv.max_hops,
        "sender.poll_interval": snd.poll_interval,
        "sender.connect_timeout": snd.connect_timeout,
        "sender.greeting_timeout": snd.greeting_timeout,
        "sender.command_timeout": snd.command_timeout,
        "sender.data_init_timeout": snd.data_init_timeout,
        "sender.data_block_timeout": snd.data_block_timeout,
        "sender.data_end_timeout": snd.data_end_timeout,
        "sender.retry_initial": snd.retry_initial,
        "sender.retry_max": snd.retry_max,
        "sender.max_queue_lifetime": snd.max_queue_lifetime,
        "sender.messages_per_connection": snd.messages_per_connection,
        "sender.relay_retry": snd.relay_retry,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {value}")
    if rcv.max_connections_per_ip < 0:
        raise ConfigError("receiver.max_connections_per_ip: must be 0 (off) or more")
    _check_relays(snd)
    if bool(rcv.tls_cert) != bool(rcv.tls_key):
        raise ConfigError("receiver.tls_cert and receiver.tls_key must be set together")
    if rcv.tls_listen and not rcv.tls_cert:
        raise ConfigError("receiver.tls_listen needs receiver.tls_cert and receiver.tls_key")
    if config.metrics.listen and config.metrics.listen in (rcv.listen, rcv.tls_listen):
        raise ConfigError(f"metrics.listen: {config.metrics.listen} is an SMTP listen address")
    if log.level.upper() not in ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"):
        raise ConfigError(f"log.level: unknown level {log.level!r}")
    if log.retention < 0:
        raise ConfigError("log.retention: must be 0 or more")
    # useradd's rule for a name (no leading digit or dash, no "/" or ":"), at most 32.
    if config.service.user and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}",
                                                config.service.user):
        raise ConfigError(f"service.user: {config.service.user!r} is not a user name")
    try:
        log.rotation_bytes  # noqa: B018 - validates the size text
    except ValueError as err:
        raise ConfigError(f"log.rotation: {err}") from None


_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")


def _check_mail_sections(config: Config) -> None:
    """[aliases], [rewrite] and [dkim] name addresses and domains: check them."""
    try:
        AliasTable.from_config(config.aliases, config.local.domains)
    except AliasError as err:
        raise ConfigError(f"aliases: {err}") from None
    rewrite = config.rewrite
    if rewrite.envelope_sender:
        _check_address("rewrite.envelope_sender", rewrite.envelope_sender)
    for key, value in rewrite.senders.items():
        _check_address(f"rewrite.senders.{key!r}", key, domain_ok=True)
        _check_address(f"rewrite.senders.{key!r}", value, domain_ok=True)
    dkim = config.dkim
    entries = [(f"dkim.keys[{index}]", key) for index, key in enumerate(dkim.keys)]
    if dkim.domain or dkim.selector or dkim.key_file:
        entries.insert(0, ("dkim", DkimKeyConfig(dkim.domain, dkim.selector, dkim.key_file)))
    domains: set[str] = set()
    for where, key in entries:
        if not (key.domain and key.selector and key.key_file):
            raise ConfigError(f"{where}: domain, selector and key_file must be set together")
        for name, value in (("domain", key.domain), ("selector", key.selector)):
            if not is_dns_name(value):
                raise ConfigError(f"{where}.{name}: {value!r} is not a DNS name")
        if key.domain.lower() in domains:
            raise ConfigError(f"{where}.domain: {key.domain!r} has a key already")
        domains.add(key.domain.lower())


def is_dns_name(text: str) -> bool:
    """A DKIM domain or selector: letters, digits and hyphens in dot-separated labels."""
    return bool(_DNS_NAME.fullmatch(text))


def _check_address(key: str, value: str, domain_ok: bool = False) -> None:
    """`local@domain`, or `@domain` where `domain_ok`; ConfigError naming `key` if not."""
    address = f"postmaster{value}" if domain_ok and value.startswith("@") else value
    try:
        check_mailbox(address)
    except PathSyntaxError as err:
        raise ConfigError(f"{key}: {value!r}: {err}") from None
