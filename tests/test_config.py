"""Configs: defaults, overrides, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from privrec.config import ExperimentConfig, load_config
from privrec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


# Method configs carry one extra top-level section and load with their method's config class.
METHOD_SECTIONS = {"federated": "privrec.federated.config:FederatedConfig"}


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    import importlib

    import yaml

    raw = yaml.safe_load((ROOT / "configs" / name).read_text()) or {}
    cls = ExperimentConfig
    for section, ref in METHOD_SECTIONS.items():
        if section in raw:
            module, attr = ref.split(":")
            cls = getattr(importlib.import_module(module), attr)
    cfg = load_config(ROOT / "configs" / name, cls=cls)
    assert isinstance(cfg, cls) and isinstance(cfg, ExperimentConfig)


def test_real_model_is_the_default():
    cfg = load_config(None)
    assert cfg.model.name == "smollm2-135m" and cfg.data.source == "ml-100k"
    assert load_config(ROOT / "configs" / "demo.yaml").model.name == "smollm2-135m"


def test_overrides_parse_yaml_values():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.lr=0.01", "lora.target_modules=[q_proj]",
                                                       "data.n_train=null"])
    assert cfg.train.lr == 0.01 and cfg.lora.target_modules == ["q_proj"] and cfg.data.n_train is None


@pytest.mark.parametrize("override,where", [
    ("train.epoch=3", "train.epoch: unknown key"),
    ("bogus.x=1", "bogus: unknown key"),
    ("train.lr=-1", "train.lr"),
    ("data.split=[0.5,0.5,0.5]", "data.split"),
    ("augment.copies=2", "augment.copies"),
])
def test_errors_name_the_key(override, where):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "tiny.yaml", [override])
    assert where in str(e.value) and "\n" not in str(e.value)


def test_augmentation_needs_kv_template():
    with pytest.raises(ConfigError, match="template=kv"):
        load_config(None, ["augment.shuffle=true", "augment.copies=2"])
    assert load_config(None, ["augment.shuffle=true", "augment.copies=2", "prompt.template=kv"]).augment.copies == 2


def test_digest_tracks_content():
    a, b = load_config(None), load_config(None, ["seed=1"])
    assert a.digest() != b.digest() and a.digest() == load_config(None).digest()
    assert a.digest("data") == b.digest("data")
