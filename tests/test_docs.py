"""The docs cannot drift: the configuration reference equals what the models generate, the shipped presets
validate against their models, and every relative link in README.md and docs/ points at a file that exists."""

from __future__ import annotations

import importlib.util
import re

import pytest

from recsys.config import presets
from recsys.paths import REPO_ROOT


def _gen():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO_ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date():
    gen = _gen()
    assert gen.DOC.read_text() == gen.render(), "docs/configuration.md is stale: run python scripts/gen_config_docs.py"


def test_configuration_reference_lists_every_field():
    from recsys.config.data import SyntheticConfig
    from recsys.config.experiment import ExperimentConfig
    from recsys.config.http import ServiceConfig

    text = _gen().render()

    def keys(model, prefix=""):
        for name, f in model.model_fields.items():
            yield prefix + name
            if isinstance(f.annotation, type) and hasattr(f.annotation, "model_fields"):
                yield from keys(f.annotation, prefix + name + ".")

    for model in (ExperimentConfig, ServiceConfig, SyntheticConfig):
        for key in keys(model):
            assert f"| `{key}` |" in text, key


def test_check_mode_fails_on_a_stale_file(tmp_path):
    gen = _gen()
    doc = tmp_path / "configuration.md"
    doc.write_text(gen.render())
    assert gen.main(["--check", "--out", str(doc)]) == 0
    doc.write_text(gen.render().replace("| `model.top_k` | int | `20` |", "| `model.top_k` | int | `21` |"))
    assert gen.main(["--check", "--out", str(doc)]) == 1


@pytest.mark.parametrize("name", presets.names())
def test_presets_validate(name):
    from recsys.config.base import load_yaml
    from recsys.config.experiment import ExperimentConfig
    from recsys.config.http import ServiceConfig

    load_yaml(presets.preset_path(name), ServiceConfig if name.startswith("serve") else ExperimentConfig)


def test_relative_links_resolve():
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert not broken, broken
