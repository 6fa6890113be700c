"""Every run on a GGUF folder used to print two library warnings; neither reaches the user now."""

from __future__ import annotations

import warnings

from conftest import make_model, tiny_config

from privrec.model.adapters import save_adapter


def test_attaching_lora_and_saving_an_adapter_of_a_gguf_folder_warn_nothing(ml100k, tmp_path):
    gguf_folder = tmp_path / "gguf-model"  # a GGUF folder: weights, no config.json
    gguf_folder.mkdir()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m = make_model(tiny_config(), ml100k)  # peft's `is_gradient_checkpointing` FutureWarning came here
        for cfg in m.model.peft_config.values():
            cfg.base_model_name_or_path = str(gguf_folder)
        save_adapter(m.model, tmp_path / "adapter", {})  # peft's "Could not find a config file" came here
    messages = [str(w.message) for w in seen]
    assert not [s for s in messages if "is_gradient_checkpointing" in s or "Could not find a config file" in s]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
