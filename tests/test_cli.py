"""The `recsys` command line: every command's --help carries an example, user errors end in `error:` lines and
exit status 2 (no traceback), and `evaluate --ray` gives the metrics of the single-process `evaluate`.

Commands run in-process through typer's runner (the real app, real sockets, real Ray); only the
seconds-long Ray evaluation needs more than a fraction of a second.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
from typer.testing import CliRunner

from recsys.cli import app

runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A small synthetic dataset folder and a DARE bundle trained on it for a few steps."""
    from recsys.bundle import export_bundle
    from recsys.config.data import SyntheticConfig
    from recsys.config.experiment import load_experiment
    from recsys.config.presets import preset_path
    from recsys.data.sequences import iterate_batches, load_dataset
    from recsys.data.synthetic import generate
    from recsys.models import build_model
    from recsys.train.step import make_optimizers, train_step

    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "data"
    generate(SyntheticConfig.model_validate({"n_users": 40, "events_per_user": {"mean": 150.0, "max": 400},
                                              "n_items": 800, "n_cates": 20, "window": 30}), data)
    cfg = load_experiment(preset_path("tiny"), {"data": str(data)})
    ds = load_dataset(data)
    torch.manual_seed(0)
    model = build_model(cfg.model, ds.n_items, ds.n_cates)
    opt = make_optimizers(model, cfg.train)
    for i, b in enumerate(iterate_batches(ds.store, ds.splits["train"], cfg.model.max_len, 128, shuffle=True, seed=0)):
        train_step(model, b, opt, 1.0)
        if i == 5:
            break
    model.eval()
    return export_bundle(model, cfg, tmp / "bundle", {}, ds)


def test_every_command_help_has_an_example():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"generate", "prepare", "preprocess", "stats", "train", "evaluate", "serve", "stream-worker", "demo",
            "report"} <= set(names)
    assert "Example: recsys demo" in invoke("--help").output
    for name in names:
        r = invoke(name, "--help")
        assert r.exit_code == 0, name
        examples = [line for line in r.output.splitlines() if line.strip().startswith("Example:")]
        assert any(f"recsys {name} " in line for line in examples), (name, r.output)


def _assert_user_error(r, *needles: str) -> None:
    assert r.exit_code == 2, (r.exit_code, r.output, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), r.stderr
    assert "Traceback" not in r.output + r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_bad_paths(tmp_path):
    _assert_user_error(invoke("evaluate", "--bundle", tmp_path / "nope"), "not a model bundle")
    _assert_user_error(invoke("stats", tmp_path), "not a dataset folder")
    _assert_user_error(invoke("train", "--config", tmp_path / "nope.yaml"), "config file not found")
    _assert_user_error(invoke("prepare", "--input", tmp_path / "nope.csv", "--out", tmp_path / "out"), "file not found")
    _assert_user_error(invoke("report", tmp_path / "nope"), "not found")
    _assert_user_error(invoke("serve", "--bundle", tmp_path, "--port", "0"), "not a model bundle")
    _assert_user_error(invoke("evaluate", "--bundle", tmp_path, "--split", "dev"), "--split")


def test_bad_configs(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [\n")
    _assert_user_error(invoke("train", "--config", broken), "broken.yaml: not valid YAML: line 2, column 1")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("data: x\nmodel:\n  top_k: 0\n  nmae: dare\n")
    r = invoke("train", "--config", wrong)
    _assert_user_error(r, "wrong.yaml: model.top_k: Input should be greater than or equal to 1",
                       "wrong.yaml: model.nmae: unknown key")
    serve_cfg = tmp_path / "serve.yaml"
    serve_cfg.write_text("http:\n  port: '8000'\n")  # strings are not coerced
    _assert_user_error(invoke("serve", "--config", serve_cfg), "serve.yaml: http.port")


def test_port_in_use(tiny_bundle):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = invoke("serve", "--bundle", tiny_bundle, "--port", port)
    _assert_user_error(r, f"cannot listen on 127.0.0.1:{port}")


def test_short_api_key_from_the_environment_is_refused(tiny_bundle):
    r = invoke("serve", "--bundle", tiny_bundle, "--port", "0", "--workers", "2", env={"RECSYS_API_KEY": "abc"})
    _assert_user_error(r, "RECSYS_API_KEY: 3 characters", "at least 16")


def test_redis_unreachable(tiny_bundle):
    with socket.socket() as s:  # a port nobody listens on: bound here, never listening
        s.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
        for args in (("serve", "--bundle", tiny_bundle, "--port", "0"), ("stream-worker", "--bundle", tiny_bundle)):
            _assert_user_error(invoke(*args, env={"REDIS_URL": url}), "Redis unreachable", "onnection refused")


def _json(output: str) -> dict:
    return json.loads(output[output.index("{"):output.rindex("}") + 1])


def test_evaluate_ray_gives_the_single_process_metrics(tiny_bundle):
    single = invoke("evaluate", "--bundle", tiny_bundle, "--split", "val")
    assert single.exit_code == 0, single.stderr
    ray = invoke("evaluate", "--bundle", tiny_bundle, "--split", "val", "--ray", "--workers", "2")
    assert ray.exit_code == 0, ray.stderr
    want, got = _json(single.stdout), _json(ray.stdout)
    assert "rows_per_s" in got and "rows_per_s" not in want  # the Ray job really ran
    assert got["rows"] == want["rows"] > 100
    # the same metric set (the synthetic data's evidence recall and ceiling too); the AUCs exactly: each
    # actor scored whole users (its range of the manifest's plan)
    assert set(got) - {"rows_per_s", "wall_s", "ranks"} == set(want)
    for k in ("auc", "gauc", "cate_auc", "ceiling_auc"):
        assert got[k] == want[k], k
    for k in set(want) - {"auc", "gauc", "cate_auc", "ceiling_auc"}:
        assert got[k] == pytest.approx(want[k], rel=1e-9), k
    assert 0.0 < want["auc"] < 1.0
    assert got["ranks"][0]["users"][0] == 0 and sum(r["rows"] for r in got["ranks"]) == got["rows"]


def test_generate_flags_override_the_config_only_when_given(tmp_path):
    cfg = tmp_path / "synth.yaml"
    cfg.write_text("n_users: 7\nevents_per_user: {mean: 40.0, max: 80}\nn_items: 400\nn_cates: 10\nwindow: 10\n")
    r = invoke("generate", "--out", tmp_path / "a", "--config", cfg)
    assert r.exit_code == 0, r.stderr
    assert _json(r.stdout)["n_users"] == 7
    r = invoke("generate", "--out", tmp_path / "b", "--config", cfg, "--users", "5")
    assert r.exit_code == 0, r.stderr
    assert _json(r.stdout)["n_users"] == 5


def test_rebuild_state_from_an_event_log(tiny_bundle, redis_server, tmp_path):
    """`recsys rebuild-state --log`: every user of the log gets a state of the bundle's version (the Ray
    job itself, and that its states equal the streamed ones, are tests/test_pipeline_rebuild.py's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import redis
    import yaml

    from recsys.bundle import load_bundle
    from service.keys import KeySpace

    n = 12
    pq.write_table(pa.table({"event_id": [f"e{i}" for i in range(n)], "user_id": [i % 3 for i in range(n)],
                             "item_id": [1 + i for i in range(n)], "category_id": [1] * n,
                             "action": pa.array([0] * n, pa.int8()), "ts": [1_000 * i for i in range(n)]}),
                   tmp_path / "log.parquet")
    prefix = f"cli-rebuild-{tmp_path.name}:"
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({"serve": {"state": {"redis_url": redis_server,
                                                                              "key_prefix": prefix}}}))
    r = invoke("rebuild-state", "--bundle", tiny_bundle, "--log", tmp_path / "log.parquet",
               "--config", tmp_path / "serve.yaml", "--workers", "1")
    assert r.exit_code == 0, r.output + r.stderr
    out = _json(r.output)
    assert out["users"] == out["rebuilt"] == 3
    client, keys = redis.Redis.from_url(redis_server), KeySpace(prefix)
    version = load_bundle(tiny_bundle).version
    assert all(client.exists(keys.user(u).state(version)) for u in range(3))
    for k in client.scan_iter(match=prefix + "*"):
        client.delete(k)
    client.close()
