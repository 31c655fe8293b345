import functools
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


def reference_dir() -> Path:
    return Path(os.environ.get("VGEN_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference():
    """Path to the golden data produced by running the original VGen code."""
    path = reference_dir()
    if not (path / "README.md").exists():
        pytest.skip(f"golden reference data not found at {path} (set VGEN_REFERENCE_DIR)")
    return path


def load_reference_json(name: str) -> dict:
    return json.loads((reference_dir() / name).read_text())


@functools.cache
def load_golden(variant: str) -> tuple[dict, dict]:
    """``(meta, tensors)`` of the golden ``<variant>.json`` / ``<variant>.safetensors`` (read once per session)."""
    from safetensors.torch import load_file

    return load_reference_json(f"{variant}.json"), load_file(str(reference_dir() / f"{variant}.safetensors"))


def golden_model(variant: str, dtype=None):
    """The original class of the golden ``variant`` built through ``vgen.compat.vgen`` with its recorded weights."""
    import torch

    from vgen.compat import vgen as compat

    meta, data = load_golden(variant)
    model = compat.build_unet(meta["class"], meta["constructor_kwargs"]).eval()
    compat.load_state_dict(model, {k[len("weights."):]: v.float() for k, v in data.items() if k.startswith("weights.")})
    return model.to(dtype or torch.float32)


def compose_unet_config(name: str, *overrides: str):
    """The resolved ``model.unet`` config of ``conf/model/unet/<name>.yaml`` (composed from the root config, so its
    condition defaults from ``conf/model/condition`` apply)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[f"model/unet={name}", *overrides]).model.unet
