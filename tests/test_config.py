"""config: ${VAR} expansion, .env, casters and the settings table."""
from __future__ import annotations

import pytest

from meetinity_gateway import config
from meetinity_gateway.config import ConfigError, cast_settings, expand


def test_expand_variables_and_defaults():
    env = {"A": "1", "EMPTY": ""}
    assert expand("x${A}y", environ=env) == "x1y"
    assert expand("${B:-fallback}", environ=env) == "fallback"
    assert expand("${EMPTY:-fallback}", environ=env) == "fallback"
    assert expand("${A:-fallback}", environ=env) == "1"
    assert expand("${B:-}", environ=env) == ""
    assert expand("${B:-http://h:1/p}", environ=env) == "http://h:1/p"
    assert expand("no variables, $HOME stays", environ=env) == "no variables, $HOME stays"


def test_unset_required_variable_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        expand("${JWT_SECRET}", key="secret", environ={})
    assert "JWT_SECRET" in str(info.value) and "secret" in str(info.value)


@pytest.mark.parametrize("caster, value, expected", [
    (config.as_bool, "Yes", True), (config.as_bool, "off", False), (config.as_bool, "0", False),
    (config.as_list, "a, b,,c\nd", ["a", "b", "c", "d"]),
    (config.as_positive_int, "8", 8), (config.as_positive_int, "1_000", 1000),
    (config.as_non_negative_int, "0", 0),
    (config.as_positive_float, "0.5", 0.5),
    (config.as_size, "1024", 1024), (config.as_size, "512k", 512 * 1024),
    (config.as_size, "10M", 10 * 1024 ** 2), (config.as_size, "1GiB", 1024 ** 3),
    (config.as_size, "2 mb", 2 * 1024 ** 2),
])
def test_casters(caster, value, expected):
    assert caster(value) == expected


@pytest.mark.parametrize("caster, value", [
    (config.as_bool, "maybe"), (config.as_positive_int, "0"), (config.as_positive_int, "x"),
    (config.as_non_negative_int, "-1"), (config.as_positive_float, "-2"),
    (config.as_positive_float, "nan"), (config.as_positive_float, "inf"),
    (config.as_size, "10 parsecs"), (config.as_size, "-1"),
])
def test_casters_reject(caster, value):
    with pytest.raises(ValueError):
        caster(value)


@pytest.mark.parametrize("caster, value, expected", [
    (config.as_non_negative_float, "0", 0.0), (config.as_non_negative_float, "0.00", 0.0),
    (config.as_non_negative_float, " 2.5 ", 2.5),
    (config.as_optional_str, "  ", None), (config.as_optional_str, " iss ", "iss"),
    (config.as_optional_list, " , ", None), (config.as_optional_list, "a,b", ["a", "b"]),
    (config.as_listen, " 127.0.0.1:8080   [::1]:80 ", "127.0.0.1:8080 [::1]:80"),
])
def test_shared_casters(caster, value, expected):
    assert caster(value) == expected


@pytest.mark.parametrize("caster, value, reason", [
    (config.as_non_negative_float, "-0.5", "at least 0"),
    (config.as_non_negative_float, "inf", "at least 0"),
    (config.as_non_negative_float, "soon", "expected a number"),
    (config.as_listen, "8080", "HOST:PORT"), (config.as_listen, "h:99999", "1 to 65535"),
    (config.as_listen, "::1:80", "HOST:PORT"), (config.as_listen, " ", "HOST:PORT"),
])
def test_shared_casters_reject_with_a_reason(caster, value, reason):
    with pytest.raises(ValueError, match=reason):
        caster(value)


def test_split_named_takes_kind_dot_name_keys_in_order_and_leaves_the_rest():
    named, rest = config.split_named(
        {"rule.b": "2", "timeout": "1", "rule.a": "1", "rule.": "x", "route.r": "/r",
         "policy.r": "p"}, "rule", "route")
    assert named == {"rule": {"b": "2", "a": "1"}, "route": {"r": "/r"}}
    assert list(named["rule"]) == ["b", "a"]
    # no name, or a kind not asked for: left for the settings table (an unknown key there)
    assert rest == {"timeout": "1", "rule.": "x", "policy.r": "p"}


TABLE = {"timeout": config.as_positive_float, "enabled": config.as_bool}


def test_cast_settings_names_file_section_key_and_value(monkeypatch):
    monkeypatch.setenv("T", "soon")
    with pytest.raises(ConfigError) as info:
        cast_settings({"timeout": "${T}"}, TABLE, {"__file__": "/srv/gw.ini"}, "filter:x")
    message = str(info.value)
    assert message.startswith("/srv/gw.ini [filter:x] timeout = 'soon': expected a number")


def test_cast_settings_rejects_unknown_keys():
    with pytest.raises(ConfigError, match=r"timout = '3': unknown key \(known keys: enabled, "):
        cast_settings({"timout": "3"}, TABLE)


def test_cast_settings_casts():
    assert cast_settings({"timeout": "2.5", "enabled": "yes"}, TABLE) == \
        {"timeout": 2.5, "enabled": True}


def test_env_file_is_read_but_never_overrides_the_environment(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("GW_TEST_FROM_FILE=file\nGW_TEST_BOTH=file\n")
    monkeypatch.setenv("GW_TEST_BOTH", "real")
    monkeypatch.delenv("GW_TEST_FROM_FILE", raising=False)
    monkeypatch.setattr(config, "_loaded_env_files", set())
    values = config.prepare({"a": "${GW_TEST_FROM_FILE}", "b": "${GW_TEST_BOTH}"},
                            {"here": str(tmp_path)})
    assert values == {"a": "file", "b": "real"}
    monkeypatch.delenv("GW_TEST_FROM_FILE", raising=False)  # load_dotenv set it
