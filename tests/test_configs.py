"""Every config file documents every key, and every config group option composes."""

import re

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR

YAMLS = sorted(CONF_DIR.rglob("*.yaml"))
KEY_LINE = re.compile(r"^\s*(-\s+)?[\w/.@-]+\s*:")


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_every_key_has_a_one_line_comment(path):
    undocumented = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or "_self_" in stripped:
            continue
        if (KEY_LINE.match(line) or stripped.startswith("- ")) and "#" not in line:
            undocumented.append(f"{number}: {line}")
    assert not undocumented, f"{path.name}: keys without a comment:\n" + "\n".join(undocumented)


GROUP_OPTIONS = [
    (group, p.stem)
    for group in ("model/unet", "model/vae", "model/text_encoder", "model/image_encoder", "diffusion", "data",
                  "stage", "optim", "trainer", "strategy", "logger", "callbacks", "paths", "experiment", "debug")
    for p in sorted((CONF_DIR / group).glob("*.yaml"))
]


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=lambda v: str(v))
def test_every_group_option_composes(group, option):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"{group}={option}"])
    assert cfg.stage._target_.startswith("vgen.stages.")
