"""Configuration: defaults < YAML file < environment (BILLING_AGENT_...) < CLI options.

One loader builds one frozen, validated :class:`Config`. A bad key, type or value raises
:class:`ConfigError` naming the source (file path, environment variable or CLI option), the
dotted key and the reason, before anything binds a port or opens a database.

Environment variables are ``BILLING_AGENT_<SECTION>_<KEY>`` in upper case, for example
``BILLING_AGENT_DATABASE_URL`` or ``BILLING_AGENT_BILLING_NIBBLE_SECONDS``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

DEFAULT_CONFIG_FILE = "agent.yaml"
ENV_PREFIX = "BILLING_AGENT_"


class ConfigError(ValueError):
    """Invalid configuration; the message names the source, the key and the reason."""


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:///billing-agent.db"
    pool_size: int = 10
    connect_timeout_seconds: float = 5.0
    echo: bool = False


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None
    key_prefix: str = ""
    timeout_ms: int = 250


@dataclass(frozen=True)
class NodeConfig:
    id: str = "node1"


@dataclass(frozen=True)
class BillingConfig:
    nibble_seconds: int = 6
    warning_seconds: int = 0
    reservation_ttl_seconds: int = 30
    failure_policy: Literal["fail_closed", "fail_open"] = "fail_closed"
    offline_credit: str = "0"
    default_currency: str = "EUR"
    hangup_verify_seconds: float = 3.0
    store_timeout_ms: int = 250
    max_call_seconds: int = 14_400


@dataclass(frozen=True)
class DaemonConfig:
    drain_seconds: float = 20.0
    sweep_seconds: float = 5.0
    rates_poll_seconds: float = 5.0
    startup_retry_max_seconds: float = 30.0
    publish_seconds: float = 2.0


@dataclass(frozen=True)
class AsteriskConfig:
    enabled: bool = False
    agi_host: str = "127.0.0.1"
    agi_port: int = 4573
    ami_host: str = "127.0.0.1"
    ami_port: int = 5038
    ami_username: str = "billing"
    ami_secret: str = ""
    ami_ping_seconds: float = 10.0
    cdr_file: str = ""
    cdr_columns: str = "1,2,3"


@dataclass(frozen=True)
class FreeswitchConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8021
    password: str = "ClueCon"
    command_timeout_seconds: float = 5.0
    authorize_host: str = "127.0.0.1"
    authorize_port: int = 8084
    cdr_file: str = ""
    cdr_columns: str = "1,2,3"


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class CdrConfig:
    spool_dir: str = "spool"
    batch_size: int = 500
    flush_interval_ms: int = 500
    spool_max_mb: int = 1024


@dataclass(frozen=True)
class FraudConfig:
    rules_file: str = ""  # fraud rules (fraud/rules.yaml); "" = no rules
    alert_period_seconds: float = 60.0  # one alert per account and rule per period
    webhook_url: str = ""  # http(s) URL that gets every alert as a signed JSON POST; "" = none
    webhook_secret: str = ""  # HMAC-SHA256 key of the X-Billing-Signature header
    webhook_timeout_seconds: float = 5.0


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    billing: BillingConfig = field(default_factory=BillingConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    asterisk: AsteriskConfig = field(default_factory=AsteriskConfig)
    freeswitch: FreeswitchConfig = field(default_factory=FreeswitchConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cdr: CdrConfig = field(default_factory=CdrConfig)
    fraud: FraudConfig = field(default_factory=FraudConfig)
    source: str = "embedded defaults"


_SECTIONS: dict[str, type[Any]] = {
    f.name: f.type if isinstance(f.type, type) else get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "source"
}


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _convert(value: Any, hint: Any, *, from_text: bool) -> Any:
    """Convert ``value`` to ``hint`` or raise ValueError with the reason."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None or (from_text and value == ""):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, from_text=from_text)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(map(str, allowed))}, not {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"must be true or false, not {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ValueError(f"must be a whole number, not {value!r}")
    if hint is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif from_text and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"must be a number, not {value!r}")
        if not math.isfinite(number):  # nan compares false with everything: no check would catch it
            raise ValueError(f"must be a finite number, not {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"must be text, not {value!r}")
    raise ValueError(f"unsupported type {hint!r}")


_POSITIVE = {
    ("database", "pool_size"), ("database", "connect_timeout_seconds"), ("redis", "timeout_ms"),
    ("billing", "nibble_seconds"), ("billing", "reservation_ttl_seconds"),
    ("billing", "hangup_verify_seconds"), ("billing", "store_timeout_ms"),
    ("asterisk", "ami_ping_seconds"), ("freeswitch", "command_timeout_seconds"),
    ("billing", "max_call_seconds"), ("daemon", "sweep_seconds"), ("daemon", "rates_poll_seconds"),
    ("daemon", "startup_retry_max_seconds"), ("daemon", "publish_seconds"), ("cdr", "batch_size"),
    ("cdr", "flush_interval_ms"), ("cdr", "spool_max_mb"), ("fraud", "alert_period_seconds"),
    ("fraud", "webhook_timeout_seconds"),
}
_PORTS = {("asterisk", "agi_port"), ("asterisk", "ami_port"), ("freeswitch", "port"), ("metrics", "port"),
          ("freeswitch", "authorize_port")}


def _check_value(section: str, key: str, value: Any) -> None:
    if (section, key) in _POSITIVE and value <= 0:
        raise ValueError(f"must be greater than 0, not {value!r}")
    if (section, key) in _PORTS and not 0 <= value <= 65535:
        raise ValueError(f"must be a TCP port (0-65535), not {value!r}")
    if (section, key) in (("billing", "warning_seconds"), ("daemon", "drain_seconds")) and value < 0:
        raise ValueError(f"must not be negative, not {value!r}")
    if (section, key) == ("billing", "offline_credit"):
        from agent.core.money import MoneyError, parse_amount

        try:
            parse_amount(value, what="offline_credit")
        except MoneyError as exc:
            raise ValueError(str(exc)) from None
    if key == "cdr_columns":
        parts = [part.strip() for part in str(value).split(",")]
        if len(parts) != 3 or not all(part.isdigit() and int(part) >= 1 for part in parts):
            raise ValueError(f"must be three column numbers from 1 (leg id, answer, end) such as 1,5,6, not {value!r}")
    if (section, key) == ("fraud", "webhook_url") and value:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, not {value!r}")
    if (section, key) == ("node", "id") and not value.strip():
        raise ValueError("must not be empty")
    if (section, key) == ("database", "url") and "://" not in value:
        raise ValueError(f"must be an SQLAlchemy URL such as sqlite:///billing-agent.db, not {value!r}")
    if (section, key) == ("redis", "url") and value:
        from agent.redis_url import RedisUrlError, parse_redis_url

        try:
            parse_redis_url(value)
        except RedisUrlError as exc:
            raise ValueError(exc.reason) from None


def _apply(
    layers: dict[str, dict[str, Any]], data: Mapping[str, Any], source: str, *, from_text: bool
) -> None:
    for section, body in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r} (known: {', '.join(_SECTIONS)})")
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"{source}: {section}: must be a mapping of keys, not {body!r}")
        hints = get_type_hints(_SECTIONS[section])
        for key, value in body.items():
            if key not in hints:
                raise ConfigError(
                    f"{source}: {section}.{key}: unknown key (known: {', '.join(hints)})"
                )
            try:
                converted = _convert(value, hints[key], from_text=from_text)
                if converted is not None:
                    _check_value(section, key, converted)
            except ValueError as exc:
                raise ConfigError(f"{source}: {section}.{key}: {exc}") from None
            layers.setdefault(section, {})[key] = converted


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a config must say which one it means."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader that refuses duplicate keys
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Map BILLING_AGENT_SECTION_KEY variables to {section: {key: text}} and remember their names."""
    layer: dict[str, dict[str, str]] = {}
    names: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in _SECTIONS or not key:
            raise ConfigError(f"environment variable {name}: unknown setting")
        layer.setdefault(section, {})[key] = value
        names[f"{section}.{key}"] = name
    return layer, names


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    cwd: Path | None = None,
) -> Config:
    """Build the configuration.

    ``path`` selects the YAML file; when it is None, ``BILLING_AGENT_CONFIG`` or ``agent.yaml`` in
    ``cwd`` is used when present, else the embedded defaults apply (SQLite in the current folder,
    no Redis). ``overrides`` come from CLI options and win over everything.
    """
    environ = os.environ if environ is None else environ
    base = cwd or Path.cwd()
    layers: dict[str, dict[str, Any]] = {}
    source = "embedded defaults"
    if path is None and environ.get(ENV_PREFIX + "CONFIG"):
        path = environ[ENV_PREFIX + "CONFIG"]
    if path is not None:
        file_path = Path(path)
        if not file_path.is_absolute():
            file_path = base / file_path
        _apply(layers, _read_yaml(file_path), str(path), from_text=False)
        source = str(path)
    elif (base / DEFAULT_CONFIG_FILE).is_file():
        _apply(layers, _read_yaml(base / DEFAULT_CONFIG_FILE), DEFAULT_CONFIG_FILE, from_text=False)
        source = DEFAULT_CONFIG_FILE
    env_layer, env_names = _env_layer(environ)
    for section, body in env_layer.items():
        for key, value in body.items():
            _apply(layers, {section: {key: value}}, f"environment variable {env_names[f'{section}.{key}']}",
                   from_text=True)
    if overrides:
        _apply(layers, overrides, "command line", from_text=False)
    sections = {name: _SECTIONS[name](**layers.get(name, {})) for name in _SECTIONS}
    config = Config(**sections, source=source)
    _check_together(config)
    return config


# The engine asks for the next slice of money this long before it is due, plus the store's own
# deadline (agent/daemon.py NIBBLE_LEAD_MARGIN_MS); the session caps the lead at half a nibble.
NIBBLE_LEAD_MARGIN_MS = 100


def _check_together(config: Config) -> None:
    """Keys that are each valid but wrong together, named with both values."""
    billing = config.billing
    nibble_ms = billing.nibble_seconds * 1000
    if billing.store_timeout_ms + NIBBLE_LEAD_MARGIN_MS > nibble_ms // 2:
        raise ConfigError(
            f"{config.source}: billing.store_timeout_ms: {billing.store_timeout_ms} ms (+{NIBBLE_LEAD_MARGIN_MS} ms) "
            f"is more than half a nibble (billing.nibble_seconds: {billing.nibble_seconds} s): a slice of money "
            f"would be asked for at most {nibble_ms // 2} ms before it is due, and a store that takes its whole "
            "deadline answers after the slice began, so calls could talk past their money; lower "
            "billing.store_timeout_ms or raise billing.nibble_seconds")
