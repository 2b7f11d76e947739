"""Service settings from the environment (RECSYS_<SECTION>__<FIELD>): every field of ServiceConfig can be set,
over the YAML file, and a bad variable is an error naming it."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import BaseModel

from recsys.config.base import ConfigError, _submodel, _wants_text, env_overrides, load_config
from recsys.config.http import ServiceConfig


def _leaves(model: type[BaseModel], value: BaseModel, path: tuple[str, ...] = ()):
    for name, f in model.model_fields.items():
        sub = _submodel(f.annotation)
        if sub is not None and isinstance(getattr(value, name), BaseModel):
            yield from _leaves(sub, getattr(value, name), path + (name,))
        else:
            yield path + (name,), f.annotation, getattr(value, name)


def test_every_field_is_settable_from_the_environment():
    """Each leaf field of ServiceConfig, set through its variable to its default rendered as text: accepted and
    read back as that value (so every name maps to its field and every type parses)."""
    default = ServiceConfig()
    leaves = list(_leaves(ServiceConfig, default))
    assert len(leaves) > 40
    env = {}
    for path, annotation, value in leaves:
        if value is None and _wants_text(annotation):
            continue  # a text field cannot be set to null from the environment: leave the variable unset
        env["RECSYS_" + "__".join(p.upper() for p in path)] = value if isinstance(value, str) else json.dumps(value)
    assert len(env) > 40
    _, names = env_overrides(ServiceConfig, env)
    assert sorted(names.values()) == sorted(env)  # every variable was taken, as its own field
    cfg = load_config(None, ServiceConfig, env)
    assert cfg == default


def test_the_environment_goes_over_the_yaml_file_and_flags_go_over_both(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"http": {"port": 8100, "max_candidates": 300},
                                    "serve": {"state": {"seq_cap": 500, "key_prefix": "file:"}}}))
    env = {"RECSYS_HTTP__PORT": "8200", "RECSYS_SERVE__STATE__KEY_PREFIX": "env:", "recsys_serve__stream__partitions": "4",
           "RECSYS_SERVE__STATE__REDIS_URL": "redis://10.0.0.5:6380/2", "RECSYS_HTTP__BATCH_WINDOW_MS": "0.5",
           "RECSYS_EMBEDDED_WORKER": "false", "RECSYS_BUNDLE": "/srv/bundles/v2", "RECSYS_HTTP__TORCH_THREADS": "null",
           # not fields of ServiceConfig: left to whatever reads them
           "RECSYS_API_KEY": "x", "RECSYS_TEST_NO_SKIP": "1", "HTTP__PORT": "1"}
    cfg = load_config(path, ServiceConfig, env)
    assert (cfg.http.port, cfg.http.max_candidates, cfg.serve.state.seq_cap) == (8200, 300, 500)
    assert cfg.serve.state.key_prefix == "env:" and cfg.serve.stream.partitions == 4
    assert cfg.serve.state.redis_url == "redis://10.0.0.5:6380/2" and cfg.http.batch_window_ms == 0.5
    assert cfg.embedded_worker is False and cfg.bundle == "/srv/bundles/v2" and cfg.http.torch_threads is None
    assert load_config(path, ServiceConfig, {}).http.port == 8100  # the YAML alone still works

    from recsys.cli.app import _service_config

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECSYS_HTTP__PORT", "8300")
        mp.setenv("RECSYS_SERVE__STATE__SEQ_CAP", "700")
        cli = _service_config(path, None, None, 8400)
    assert cli.http.port == 8400 and cli.serve.state.seq_cap == 700  # --port > environment > file


@pytest.mark.parametrize("env,words", [
    ({"RECSYS_HTTP__PORTT": "1"}, ["RECSYS_HTTP__PORTT", "unknown key", "portt"]),
    ({"RECSYS_SERVE__STATES__SEQ_CAP": "1"}, ["RECSYS_SERVE__STATES__SEQ_CAP", "unknown key"]),
    ({"RECSYS_HTTP__PORT": "eighty"}, ["RECSYS_HTTP__PORT", "http.port"]),
    ({"RECSYS_SERVE__STATE__SEQ_CAP": "0"}, ["RECSYS_SERVE__STATE__SEQ_CAP", "serve.state.seq_cap", "greater"]),
    ({"RECSYS_EMBEDDED_WORKER": "[1"}, ["RECSYS_EMBEDDED_WORKER", "not a YAML value"]),
])
def test_a_bad_variable_is_an_error_naming_it(env, words, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ServiceConfig, env)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_text_fields_take_the_value_as_it_is():
    cfg = load_config(None, ServiceConfig, {"RECSYS_SERVE__STATE__KEY_PREFIX": "123", "RECSYS_HTTP__HOST": "::1"})
    assert cfg.serve.state.key_prefix == "123" and cfg.http.host == "::1"
