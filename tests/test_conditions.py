"""The condition registry: conditions built from config, generic classifier-free dropout and guidance, any subset of
conditions, old checkpoints and configs, and a condition the framework has never seen added with one module and one
config file (tests/made_up_condition.py, tests/data/conf/model/condition/brightness.yaml)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from vgen.media import read_mp4
from vgen.models import UNet3D
from vgen.models.conditions import ConditionError
from vgen.models.conditions.classifier_free import apply_dropout, dropout_masks, guidance_pair
from vgen.models.text_encoder import OpenCLIPTextEncoder

TINY = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
        "attention_scales": (1.0,), "head_dim": 16, "init_temporal_heads": 2, "context_dim": 64,
        "decoder_context_dim": 64, "image_dim": 32, "dropout": 0.0}
I2V = {"text": {"_target_": "vgen.models.conditions.TextTokens"},
       "first_frame": {"_target_": "vgen.models.conditions.FirstFrame"},
       "image": {"_target_": "vgen.models.conditions.ImageTokens", "num_tokens": 2, "dropout": 0.5},
       "fps": {"_target_": "vgen.models.conditions.ScalarEmbedding", "required": True}}
PLUGIN_CONF = Path(__file__).parent / "data" / "conf"


def i2v_unet(seed=0, **conditions):
    torch.manual_seed(seed)
    unet = UNet3D(**TINY, conditions={**I2V, **conditions}).eval()
    with torch.no_grad():
        for p in unet.parameters():  # no zero-initialised layer hides a path
            p.normal_(0, 0.1)
    return unet


def i2v_inputs(b=2, f=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, f, 8, 8, generator=g)
    values = {"text": torch.randn(b, 5, 64, generator=g), "image": torch.randn(b, 1, 32, generator=g),
              "first_frame": torch.randn(b, 4, 1, 8, 8, generator=g), "fps": torch.tensor([8, 16][:b])}
    return x, torch.tensor([10, 700][:b]), values


class Encoders:
    """The frozen-encoder side conditions need for null values (text embeddings of two fixed prompts)."""

    device = torch.device("cpu")

    def negative_embedding(self, b):
        return torch.full((b, 5, 64), -1.0)

    def null_embedding(self, b):
        return torch.full((b, 5, 64), 2.0)


# ---------------------------------------------------------------------------------------------- the UNet side
def test_the_unet_takes_conditions_as_a_mapping_or_keywords_and_any_optional_subset():
    unet = i2v_unet()
    x, t, values = i2v_inputs()
    with torch.no_grad():
        as_mapping = unet(x, t, values)
        assert torch.equal(as_mapping, unet(x, t, **values))
        without_image = unet(x, t, {k: v for k, v in values.items() if k != "image"})  # optional: absent
    assert without_image.shape == x.shape and not torch.allclose(without_image, as_mapping)
    for required in ("text", "first_frame", "fps"):
        with pytest.raises(ConditionError, match=f"needs the condition '{required}'"):
            unet(x, t, {k: v for k, v in values.items() if k != required})
    with pytest.raises(ConditionError, match="unknown condition 'depth'"):
        unet(x, t, {**values, "depth": x})
    with pytest.raises(ConditionError, match="condition 'image' must be"):
        unet(x, t, {**values, "image": torch.randn(2, 1, 7)})


def test_a_keep_mask_zeroes_one_samples_condition_output_only():
    unet = i2v_unet()
    x, t, values = i2v_inputs()
    with torch.no_grad():
        full = unet(x, t, values)
        assert torch.equal(unet(x, t, values, keep={"image": torch.ones(2)}), full)
        dropped = unet(x, t, values, keep={"image": torch.tensor([1.0, 0.0])})
        zero_tokens = unet(x, t, values, keep={"image": torch.zeros(2)})
    assert torch.allclose(dropped[0], full[0], atol=1e-6) and not torch.allclose(dropped[1], full[1])
    assert torch.allclose(dropped[1], zero_tokens[1], atol=1e-6)


def test_token_order_is_the_config_order_and_conditions_register_in_it():
    unet = i2v_unet()
    assert list(unet.conditions) == ["text", "first_frame", "image", "fps"]
    assert [c.kind for c in unet.conditions.values()] == ["tokens", "concat+tokens", "tokens", "embedding"]
    assert unet.input_blocks[0][0].in_channels == 8  # the latent + the first frame's 4 channels


def test_old_configs_and_checkpoints_still_build_and_load():
    legacy = UNet3D(**TINY, first_frame_condition=True, fps_condition=True, image_tokens=2)
    assert list(legacy.conditions) == ["text", "first_frame", "image", "fps"]
    new = i2v_unet()
    old_names = {"conditions.image.mlp.": "image_tokens.mlp.", "conditions.fps.mlp.": "fps_embed.",
                 "conditions.first_frame.": "first_frame."}
    old_state = {}
    for key, value in new.state_dict().items():
        for ours, theirs in old_names.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        old_state[key] = value
    assert "fps_embed.0.weight" in old_state
    legacy.load_state_dict(old_state, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(legacy.state_dict().values(), new.state_dict().values()))


def test_bad_condition_configs_are_named():
    with pytest.raises(ValueError, match="conditions.image: dropout must be a probability"):
        UNet3D(**TINY, conditions={**I2V, "image": {**I2V["image"], "dropout": 1.5}})
    with pytest.raises(ValueError, match="conditions.fps._target_=torch.nn.Linear is not a Condition"):
        UNet3D(**TINY, conditions={**I2V, "fps": {"_target_": "torch.nn.Linear"}})
    with pytest.raises(ValueError, match="conditions.image: .*unexpected keyword argument 'tokens'"):
        UNet3D(**TINY, conditions={**I2V, "image": {**I2V["image"], "tokens": 3}})
    with pytest.raises(ValueError, match="'keep' cannot name a condition"):
        UNet3D(**TINY, conditions={**I2V, "keep": I2V["fps"]})
    with pytest.raises(ValueError, match="at least one must give cross-attention tokens"):
        UNet3D(**TINY, conditions={"fps": I2V["fps"]})


# ---------------------------------------------------------------------------------------------- dropout
def _conditions(k, **extra):
    """K droppable conditions of dropout 0.5 (the unit only reads their settings)."""
    unet = UNet3D(**TINY, conditions={"text": {"_target_": "vgen.models.conditions.TextTokens", "dropout": 0.5},
                                      **{f"s{i}": {"_target_": "vgen.models.conditions.ScalarEmbedding",
                                                   "dropout": 0.5, "drop_to": "zeros", **extra} for i in range(k - 1)}})
    return unet.conditions


@pytest.mark.parametrize("k", [2, 4])
def test_all_none_each_dropout_statistics_over_10k_draws(k):
    conditions = _conditions(k)
    g = torch.Generator().manual_seed(0)
    masks = dropout_masks(conditions, list(conditions), 10_000, "cpu", scheme="all_none_each", p_all_zero=0.1,
                          p_all_keep=0.1, generator=g)
    dropped = torch.stack([masks[n] for n in conditions]).float()  # [K, N]
    tol = 4 * (0.25 / 10_000) ** 0.5  # four standard errors of a proportion
    assert abs(dropped.all(0).float().mean() - (0.1 + 0.8 * 0.5**k)) < tol  # every condition dropped
    assert abs((dropped == 0).all(0).float().mean() - (0.1 + 0.8 * 0.5**k)) < tol  # every condition kept
    for row in dropped:
        assert abs(row.mean() - 0.5) < tol  # 0.1 + 0.8 * 0.5 each


def test_independent_and_joint_dropout_and_what_a_dropped_sample_gets():
    conditions = _conditions(2)
    g = torch.Generator().manual_seed(1)
    masks = dropout_masks(conditions, list(conditions), 10_000, "cpu", p_joint_zero=0.2, generator=g)
    text, scalar = masks["text"].float(), masks["s0"].float()
    assert abs(text.mean() - (1 - 0.5 * 0.8)) < 0.02 and abs(scalar.mean() - 0.6) < 0.02
    assert abs((text * scalar).mean() - (0.2 + 0.8 * 0.25)) < 0.02  # together: joint, or both alone
    assert not dropout_masks(conditions, ["text"], 8, "cpu", p_joint_zero=0.0, generator=g).keys() - {"text"}
    values = {"text": torch.randn(4, 5, 64), "s0": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    out = apply_dropout(conditions, values, {"text": torch.tensor([True, False, False, True]),
                                             "s0": torch.tensor([False, True, False, False])}, Encoders())
    assert torch.equal(out["text"][0], Encoders().negative_embedding(1)[0]) and torch.equal(out["text"][1],
                                                                                            values["text"][1])
    assert out["s0"].tolist() == [1.0, 0.0, 3.0, 4.0] and "keep" not in out
    drop = _conditions(2, drop_to="drop")
    out = apply_dropout(drop, values, {"s0": torch.tensor([False, True, False, False])}, Encoders())
    assert torch.equal(out["s0"], values["s0"]) and out["keep"]["s0"].tolist() == [1.0, 0.0, 1.0, 1.0]


def test_guidance_pair_nulls_each_condition_by_its_rule_and_batches_like_two_calls():
    from vgen.diffusion import guided_output

    unet = i2v_unet(image={**I2V["image"], "guide_to": "drop"})
    x, t, values = i2v_inputs()
    cond, uncond = guidance_pair(unet.conditions, values, Encoders())
    assert torch.equal(uncond["text"], Encoders().negative_embedding(2))  # text: the negative prompt
    assert torch.equal(uncond["first_frame"], values["first_frame"]) and torch.equal(uncond["fps"], values["fps"])
    assert uncond["keep"]["image"].tolist() == [0.0, 0.0] and cond["keep"]["image"].tolist() == [1.0, 1.0]
    with torch.no_grad():
        two = guided_output(unet, x, t, cond, uncond, 3.0)
        one = guided_output(unet, x, t, cond, uncond, 3.0, batch_cfg=True)
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- a new condition
@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "demo"
    subprocess.run([sys.executable, str(REPO / "data_pipelines" / "synthetic.py"), "--out", str(out), "--videos", "16",
                    "--images", "8", "--shard-size", "2"], check=True, capture_output=True)
    return out.parent


def test_a_new_condition_from_one_module_and_one_config_file_trains_with_its_dropout_and_samples(demo_data, tmp_path):
    from helpers import run_training
    from vgen.pipeline import VideoPipeline
    from vgen.sample import main as sample

    overrides = ["experiment=demo", "debug=tiny", f"paths.data_dir={demo_data}", f"paths.log_dir={tmp_path}",
                 f"hydra.searchpath=[file://{PLUGIN_CONF}]",
                 "+model/condition@model.unet.conditions.brightness=brightness", "data.sources.1.weight=0",
                 "callbacks.sample_videos=null", "stage.ema.enabled=false"]
    trainer = run_training(overrides, tmp_path / "run")
    brightness = trainer.lightning_module.unet.conditions["brightness"]
    seen = torch.cat(brightness.seen)  # 2 steps x 2 clips: some dropped to zero, some kept
    assert seen.numel() == 4 and (seen == 0).any() and (seen != 0).any(), seen

    ckpt = tmp_path / "run" / "checkpoints" / "step0000002.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert "unet.conditions.brightness.mlp.0.weight" in state
    pipe = VideoPipeline.from_checkpoint(ckpt)
    kwargs = {"num_frames": 2, "height": 16, "width": 16, "steps": 2, "seed": 0}
    dark = pipe("a red circle moving left", conditions={"brightness": torch.tensor([-0.9])}, **kwargs)
    bright = pipe("a red circle moving left", conditions={"brightness": torch.tensor([0.9])}, **kwargs)
    assert not torch.allclose(dark, bright)
    out = tmp_path / "bright.mp4"
    assert sample([f"checkpoint={ckpt}", "prompt=a red circle moving left", "num_frames=2", "steps=2",
                   "condition.brightness=0.9", f"out={out}"]) == 0
    assert read_mp4(out)[0].shape[0] == 2
    assert sample([f"checkpoint={ckpt}", "prompt=x", "condition.depth=1", f"out={tmp_path / 'x.mp4'}"]) == 2
    assert sample([f"checkpoint={ckpt}", "prompt=x", "condition.brightness=dim", f"out={tmp_path / 'x.mp4'}"]) == 2


def test_pipeline_conditions_come_from_prompts_images_and_fps(tmp_path):
    """An image-to-video pipeline built in memory: the image gives the first frame and its CLIP embedding, the
    unconditional branch gets the negative prompt and a zero image embedding, the first frame is kept."""
    from vgen.diffusion import build_diffusion
    from vgen.models.image_encoder import OpenCLIPImageEncoder
    from vgen.models.vae import VideoAutoencoder
    from vgen.pipeline import PipelineError, VideoPipeline

    unet = i2v_unet()
    unet.conditions["image"].stills = "zeros"
    pipe = VideoPipeline(unet, build_diffusion(), VideoAutoencoder("tiny"), OpenCLIPTextEncoder("tiny"),
                         OpenCLIPImageEncoder("tiny"), negative_prompt="ugly")
    calls = []
    unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    video = pipe("a red circle moving left", images=image, num_frames=3, height=16, width=16, steps=1, fps=4)
    assert video.shape == (1, 3, 3, 16, 16)
    cond, uncond = calls
    torch.testing.assert_close(cond["text"], pipe.encode_text(["a red circle moving left"]))
    torch.testing.assert_close(uncond["text"], pipe.encode_text(["ugly"]))
    torch.testing.assert_close(cond["image"], pipe.image_encoder(image))
    assert not uncond["image"].any() and torch.equal(uncond["first_frame"], cond["first_frame"])
    assert cond["fps"].tolist() == [4]
    with pytest.raises(PipelineError, match="image-to-video"):
        pipe("x", num_frames=2, height=16, width=16, steps=1)
    t2v = VideoPipeline(UNet3D(**TINY), build_diffusion(), VideoAutoencoder("tiny"), OpenCLIPTextEncoder("tiny"))
    with pytest.raises(PipelineError, match="takes no image"):
        t2v("x", images=image, num_frames=2, height=16, width=16, steps=1)
    with pytest.raises(PipelineError, match="unknown condition 'depth'"):
        t2v("x", conditions={"depth": image}, num_frames=2, height=16, width=16, steps=1)
