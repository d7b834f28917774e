from pathlib import Path

import pytest

from agent.config import Config, ConfigError, load_config


def test_embedded_default_is_sqlite_in_current_folder_without_redis(tmp_path: Path) -> None:
    config = load_config(environ={}, cwd=tmp_path)
    assert config.database.url == "sqlite:///billing-agent.db"
    assert config.redis.url is None
    assert config.source == "embedded defaults"


def test_agent_yaml_in_current_folder_is_used_when_present(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text("node:\n  id: pbx7\n")
    assert load_config(environ={}, cwd=tmp_path).node.id == "pbx7"


def test_layers_defaults_file_environment_cli(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("billing:\n  nibble_seconds: 10\n  warning_seconds: 5\nnode:\n  id: a\n")
    env = {"BILLING_AGENT_BILLING_NIBBLE_SECONDS": "3", "BILLING_AGENT_NODE_ID": "b"}
    config = load_config(path, environ=env, overrides={"node": {"id": "c"}})
    assert config.billing.nibble_seconds == 3  # environment beats the file
    assert config.billing.warning_seconds == 5  # the file beats the default
    assert config.node.id == "c"  # the command line beats everything
    assert config.billing.reservation_ttl_seconds == 30  # default


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.node = None  # type: ignore[misc]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("billing:\n  nible_seconds: 5\n", "billing.nible_seconds: unknown key"),
        ("bling:\n  x: 1\n", "unknown section 'bling'"),
        ("billing:\n  nibble_seconds: five\n", "billing.nibble_seconds: must be a whole number"),
        ("billing:\n  nibble_seconds: 0\n", "billing.nibble_seconds: must be greater than 0"),
        ("daemon:\n  publish_seconds: 0\n", "daemon.publish_seconds: must be greater than 0"),
        ("daemon:\n  drain_seconds: -1\n", "daemon.drain_seconds: must not be negative"),
        ("billing:\n  failure_policy: maybe\n", "billing.failure_policy: must be one of fail_closed, fail_open"),
        ("billing:\n  offline_credit: '1.1234567'\n", "billing.offline_credit: offline_credit"),
        ("asterisk:\n  agi_port: 70000\n", "asterisk.agi_port: must be a TCP port"),
        ("database:\n  url: nowhere\n", "database.url: must be an SQLAlchemy URL"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("billing: [1\n", "not valid YAML"),
    ],
)
def test_bad_file_names_file_key_and_reason(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_bad_environment_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="BILLING_AGENT_REDIS_TIMEOUT_MS: redis.timeout_ms: must be a whole"):
        load_config(environ={"BILLING_AGENT_REDIS_TIMEOUT_MS": "fast"}, cwd=Path("/nonexistent"))
    with pytest.raises(ConfigError, match="BILLING_AGENT_NOPE_X: unknown setting"):
        load_config(environ={"BILLING_AGENT_NOPE_X": "1"}, cwd=Path("/nonexistent"))


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_environment_booleans_and_optional_values() -> None:
    config = load_config(environ={"BILLING_AGENT_ASTERISK_ENABLED": "yes",
                                  "BILLING_AGENT_REDIS_URL": "redis://127.0.0.1:6379/0"},
                         cwd=Path("/nonexistent"))
    assert config.asterisk.enabled is True
    assert config.redis.url == "redis://127.0.0.1:6379/0"


def test_example_config_loads_and_documents_every_key() -> None:
    example = Path(__file__).resolve().parents[1] / "agent.yaml.example"
    config = load_config(example, environ={})
    text = example.read_text()
    import dataclasses

    for section in dataclasses.fields(config):
        if section.name == "source":
            continue
        assert f"\n{section.name}:" in text, f"section {section.name} missing from agent.yaml.example"
        for key in dataclasses.fields(getattr(config, section.name)):
            assert f"  {key.name}:" in text, f"{section.name}.{key.name} missing from agent.yaml.example"


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_non_finite_numbers_are_refused_before_anything_starts(raw: str, tmp_path: Path) -> None:
    """nan compares false with everything, so 'greater than 0' let it through (issue 14.11)."""
    with pytest.raises(ConfigError, match=r"BILLING_AGENT_BILLING_HANGUP_VERIFY_SECONDS: "
                                          r"billing\.hangup_verify_seconds: must be a finite number"):
        load_config(environ={"BILLING_AGENT_BILLING_HANGUP_VERIFY_SECONDS": raw}, cwd=tmp_path)
    path = tmp_path / "agent.yaml"
    path.write_text("daemon:\n  drain_seconds: .nan\n")
    with pytest.raises(ConfigError, match=r"daemon\.drain_seconds: must be a finite number"):
        load_config(path, environ={})


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("billing:\n  nibble_seconds: 6\n  warning_seconds: 0\n  nibble_seconds: 3\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'nibble_seconds' \(first on line 2\)") as info:
        load_config(path, environ={})
    assert "line 4" in str(info.value)


def test_a_store_deadline_longer_than_half_a_nibble_is_refused_naming_both_keys(tmp_path: Path) -> None:
    """A store step may take its whole deadline; the next slice is asked for at most half a
    nibble before it is due: a longer deadline lets calls talk past their money (seen with 2 s
    and 1 s nibbles in bench/bench_nodes.py)."""
    path = tmp_path / "agent.yaml"
    path.write_text("billing:\n  nibble_seconds: 1\n  store_timeout_ms: 2000\n")
    with pytest.raises(ConfigError, match=r"yaml: billing.store_timeout_ms: 2000 ms .*billing.nibble_seconds: 1 s"):
        load_config(path)
    path.write_text("billing:\n  nibble_seconds: 1\n  store_timeout_ms: 400\n")
    assert load_config(path).billing.store_timeout_ms == 400  # 400 + 100 ms fits in half a second
