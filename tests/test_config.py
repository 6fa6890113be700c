"""Configs: defaults, overrides, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from privrec.config import ExperimentConfig, load_config
from privrec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _config_classes() -> list[type[ExperimentConfig]]:
    """ExperimentConfig and every method's subclass of it (one extra section each, e.g. ``shards``)."""
    import importlib
    import pkgutil

    import privrec

    for mod in pkgutil.walk_packages(privrec.__path__, "privrec."):
        try:
            importlib.import_module(mod.name)
        except ImportError:  # a method whose optional dependency is not installed here
            pass
    return [ExperimentConfig, *ExperimentConfig.__subclasses__()]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    path = ROOT / "configs" / name
    sections = set(yaml.safe_load(path.read_text()))
    classes = [c for c in _config_classes() if sections <= set(c.model_fields)]
    assert classes, f"{name}: no config class has the sections {sorted(sections)}"
    cfg = load_config(path, cls=classes[0])
    assert isinstance(cfg, ExperimentConfig)


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


def test_keys_added_later_leave_earlier_digests_as_they_were():
    """A key added to a schema after digests were recorded (config.ADDED_KEYS) is left out of the digest while it
    holds its default, in the subclasses' sections too: run directories, adapters and certificates written before
    it keep their digests; a non-default value changes the digest."""
    import hashlib
    import json

    from privrec.federated.config import FederatedConfig
    from privrec.unlearning.exact.shards import ApaConfig

    for cls, section, key, other in ((FederatedConfig, "federated", "keep", "best-valid"),
                                     (ApaConfig, "shards", "own_weight", 0.5)):
        cfg = load_config(None, cls=cls)
        fields = json.loads(cfg.model_dump_json())[section]
        written = {section: {k: v for k, v in fields.items() if k != key}}  # the section before the key existed
        assert cfg.digest(section) == hashlib.sha256(json.dumps(written, sort_keys=True).encode()).hexdigest()[:16]
        changed = load_config(None, [f"{section}.{key}={other}"], cls=cls)
        assert changed.digest(section) != cfg.digest(section) and changed.digest() != cfg.digest()
