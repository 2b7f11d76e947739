"""Model bundle: the folder training exports and serving loads (DESIGN section 2). Never pickle.

  config.yaml        the ExperimentConfig the model was trained with
  model.safetensors  every weight and buffer (tables as `<set>.<table>`)
  metrics.json       validation/test metrics of these weights
  id_space.json      n_items, n_cates, max_len, dataset source: which ids the tables cover
  vocab.safetensors  the catalogue vocabulary: raw item / category ids -> dense table ids, and each item's
                     category (recsys.vocab); serving stores raw ids and maps them with it
  VERSION            content hash of weights + config + id space + vocabulary (the model version serving keys
                     its state by)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from recsys.config.base import validate
from recsys.config.experiment import ExperimentConfig
from recsys.vocab import FILE as VOCAB_FILE
from recsys.vocab import Vocabulary, VocabularyError

FILES = ("config.yaml", "model.safetensors", "metrics.json", "id_space.json", VOCAB_FILE, "VERSION")


class BundleError(ValueError):
    """A bundle folder is missing a file or does not match its own description."""


@dataclass
class Bundle:
    model: nn.Module        # in eval mode
    config: ExperimentConfig
    metrics: dict
    id_space: dict
    vocab: Vocabulary
    version: str


def _version(weights: bytes, config_text: str, id_space_text: str, vocab: bytes) -> str:
    """Everything that changes a score: the id space and the vocabulary too (they decide which raw id is
    which row, and which ids are out of vocabulary), so an edited id_space.json or vocab.safetensors cannot
    change scores under the same version."""
    h = hashlib.sha256()
    for part in (weights, config_text.encode(), id_space_text.encode(), vocab):
        h.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two splits of the bytes collide
        h.update(part)
    return h.hexdigest()[:16]


def export_bundle(model: nn.Module, config: ExperimentConfig, out_dir: str | Path, metrics: dict, dataset=None,
                  vocab: Vocabulary | None = None) -> Path:
    """Write `model` (its current weights) as a bundle folder; returns the folder. `vocab`: the raw -> dense id
    maps; default: the dataset's (`Dataset.vocabulary()`), without a dataset the identity of the tables."""
    from recsys.checkpoint import state_tensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=True)
    (out / "config.yaml").write_text(config_text)
    save_file(state_tensors(model), out / "model.safetensors")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    source = dataset.meta.get("source", config.data) if dataset is not None else config.data
    id_space = {"n_items": model.rows["item"], "n_cates": model.rows["cate"], "max_len": config.model.max_len, "dataset": str(source)}
    id_space_text = json.dumps(id_space, indent=2)
    (out / "id_space.json").write_text(id_space_text)
    if vocab is None:
        vocab = dataset.vocabulary() if dataset is not None else Vocabulary.identity(id_space["n_items"], id_space["n_cates"])
    _check_vocab(vocab, id_space, out)
    vocab.save(out / VOCAB_FILE)
    (out / "VERSION").write_text(_version((out / "model.safetensors").read_bytes(), config_text, id_space_text,
                                          (out / VOCAB_FILE).read_bytes()) + "\n")
    return out


def _check_vocab(vocab: Vocabulary, id_space: dict, where: Path) -> None:
    if vocab.n_items > int(id_space["n_items"]) or vocab.n_cates > int(id_space["n_cates"]):
        raise BundleError(f"{where}: the vocabulary needs {vocab.n_items} item and {vocab.n_cates} category rows, the "
                          f"tables have {id_space['n_items']} and {id_space['n_cates']}")


def load_bundle(bundle_dir: str | Path) -> Bundle:
    """-> the model in eval mode (plain, unsharded tables), its config, metrics, id space and version."""
    from recsys.checkpoint import load_state_tensors
    from recsys.models import build_model

    d = Path(bundle_dir)
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        raise BundleError(f"{d}: not a model bundle, missing {missing}")
    config_text = (d / "config.yaml").read_text()
    config = validate(ExperimentConfig, yaml.safe_load(config_text), str(d / "config.yaml"))
    version = (d / "VERSION").read_text().strip()
    weights_bytes = (d / "model.safetensors").read_bytes()
    id_space_text = (d / "id_space.json").read_text()
    vocab_bytes = (d / VOCAB_FILE).read_bytes()
    if _version(weights_bytes, config_text, id_space_text, vocab_bytes) != version:
        raise BundleError(f"{d}: VERSION {version} does not match the weights, config, id space and vocabulary "
                          "(modified bundle?)")
    id_space = json.loads(id_space_text)
    try:
        vocab = Vocabulary.load(d / VOCAB_FILE)
    except VocabularyError as e:
        raise BundleError(str(e)) from None
    _check_vocab(vocab, id_space, d)
    if config.model.embedding_backend == "fused":  # serving needs no process group: same tables, unsharded
        config = config.model_copy(update={"model": config.model.model_copy(update={"embedding_backend": "sparse"})})
    model = build_model(config.model, int(id_space["n_items"]), int(id_space["n_cates"]))
    load_state_tensors(model, load_file(d / "model.safetensors"))
    model.eval()
    return Bundle(model, config, json.loads((d / "metrics.json").read_text()), id_space, vocab, version)
