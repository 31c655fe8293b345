"""DreamVideo's network: the identity and motion adapters applied to the base UNet from outside it, the appearance
condition they read, and ``vgen.compat.vgen.build_unet("UNetSD_DreamVideo", ...)`` against the original's golden
outputs and full-size key manifests."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import CONF_DIR, compose_unet_config, golden_model, load_golden, load_reference_json
from vgen.compat import vgen as compat
from vgen.models import UNet3D
from vgen.models.adapters import adapter_parameter_names, mark_only_adapters_trainable
from vgen.models.conditions.classifier_free import apply_dropout, dropout_masks
from vgen.models.dreamvideo import BottleneckAdapter, IdentityAdapter, MotionAdapter

VARIANT = "dreamvideo_unet_tiny"
CASES = ["case0", "case_zero_image", "case_no_image", "case_perframe_ag"]
# the golden's tiny constructor arguments (context 1024: the original hard-codes it for decoder cross-attention)
TINY = {"in_dim": 4, "dim": 32, "y_dim": 64, "context_dim": 1024, "out_dim": 4, "dim_mult": [1, 1], "num_heads": 2,
        "head_dim": 16, "num_res_blocks": 1, "attn_scales": [], "dropout": 0.1, "temporal_attention": True}
JOINT = {"spatial_adapter_list": ["cross_attention"],
         "temporal_adapter_list": ["self_attention", "cross_attention", "feedforward"],
         "temporal_adapter_condition_dim": 64}
ADAPTER_KWARGS = set(compat._DREAMVIDEO_DEFAULTS)
def _golden(reference):
    return load_golden(VARIANT)


def _golden_model(reference, dtype=torch.float32):
    return golden_model(VARIANT, dtype)


def _golden_inputs(data, case, dtype):
    prefix = f"{case}.input."
    return {k[len(prefix):]: v.to(dtype) if v.is_floating_point() else v for k, v in data.items()
            if k.startswith(prefix)}


@torch.no_grad()
def _randomise(model, names=None, std=0.1, seed=0):
    """Every parameter (or those named) random and non-zero, so every path matters."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if names is None or name in names:
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.ndim == 1 and name.endswith("weight") else 0))


def _adapted_and_base(kwargs, seed=0):
    """A UNetSD_DreamVideo with random base weights (adapters as initialised) and the plain T2V network with the same
    base weights."""
    model = compat.build_unet("UNetSD_DreamVideo", kwargs).eval()
    base = compat.build_unet("UNetSD_T2VBase", {k: v for k, v in kwargs.items() if k not in ADAPTER_KWARGS}).eval()
    adapters = set(adapter_parameter_names(model, model.vgen_adapters))
    _randomise(model, {n for n, _ in model.named_parameters() if n not in adapters}, seed=seed)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k not in adapters}, strict=True)
    return model, base


def _inputs(frames=3, size=(8, 8), condition_dim=64, seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, frames, *size, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 5, 1024, generator=g) * 0.5, torch.randn(batch, 1, condition_dim, generator=g))


# ---------------------------------------------------------------------------------------------- golden parity
def test_golden_state_dict_keys_shapes_and_order(reference):
    meta, _ = _golden(reference)
    model = compat.build_unet(meta["class"], meta["constructor_kwargs"])
    assert [(k, list(v.shape)) for k, v in compat.state_dict(model).items()] == [
        (k, list(s)) for k, s in meta["state_dict_keys_in_order"]]
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]
    assert set(model.vgen_adapters) == {"identity", "motion"}


@pytest.mark.parametrize("case", CASES)
def test_golden_forward_fp32_and_fp64(reference, case):
    meta, data = _golden(reference)
    scalars = meta["cases"][case].get("scalar_kwargs", {})
    for dtype, key, check in ((torch.float32, "output", None), (torch.float64, "output_fp64", 1e-6)):
        inputs = _golden_inputs(data, case, dtype)
        with torch.no_grad():
            out = compat.forward(_golden_model(reference, dtype), inputs.pop("x"), inputs.pop("t"), **inputs, **scalars)
        if check is None:
            torch.testing.assert_close(out, data[f"{case}.{key}"], rtol=1e-4, atol=1e-4)
        else:
            assert (out - data[f"{case}.{key}"]).abs().max().item() < check


def test_golden_appearance_semantics(reference):
    """[B,1,C] equals that row repeated per frame; strength 0 equals no image; a zero image is not no image."""
    _, data = _golden(reference)
    model = _golden_model(reference)
    inputs = _golden_inputs(data, "case0", torch.float32)
    x, t, y, image = inputs["x"], inputs["t"], inputs["y"], inputs["y_image"]
    with torch.no_grad():
        one = compat.forward(model, x, t, y=y, y_image=image)
        repeated = compat.forward(model, x, t, y=y, y_image=image.expand(-1, x.shape[2], -1))
        no_image = compat.forward(model, x, t, y=y)
        zero_strength = compat.forward(model, x, t, y=y, y_image=image, ag_strength=0.0)
        zero_image = compat.forward(model, x, t, y=y, y_image=torch.zeros_like(image))
    assert torch.equal(one, repeated)
    assert torch.equal(zero_strength, no_image)
    assert (zero_image - no_image).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------------------- full-size manifests
@pytest.mark.parametrize("variant", ["dreamvideo_subject_unet", "dreamvideo_motion_unet", "dreamvideo_joint_unet"])
def test_full_size_key_manifests(reference, variant):
    meta = load_reference_json(f"{variant}.keys.json")
    with torch.device("meta"):
        model = compat.build_unet(meta["class"], meta["constructor_kwargs"])
    assert [(k, list(v.shape)) for k, v in compat.state_dict(model).items()] == [(k, list(s)) for k, s in
                                                                                meta["state_dict"]]
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == meta["num_parameters"]
    adapters = adapter_parameter_names(model, model.vgen_adapters)
    assert sum(params[n].numel() for n in adapters) == meta["params_by_module_type"]["Adapter"]
    spatial = model.spatial_parameter_names()  # VGen's 682 SD-2.1 keys: no adapter among them
    assert len(spatial) == meta["keys_in_vgen_spatial_keylist"]
    assert sum(params[n].numel() for n in spatial) == meta["params_in_vgen_spatial_keylist"]
    assert not set(adapters) & set(model.temporal_parameter_names())


def test_configs_build_the_joint_network(reference):
    """model/unet=dreamvideo plus the two adapter configs build the original joint network (keys, shapes, order)."""
    meta = load_reference_json("dreamvideo_joint_unet.keys.json")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "model/unet=dreamvideo", "+model/adapter@stage.adapters.identity=dreamvideo_identity",
            "+model/adapter@stage.adapters.motion=dreamvideo_motion"])
    with torch.device("meta"):
        unet = instantiate(compose_unet_config("dreamvideo"))
        for spec in cfg.stage.adapters.values():
            instantiate(spec).apply(unet)
        original = compat.build_unet(meta["class"], meta["constructor_kwargs"])
    assert [(k, list(v.shape)) for k, v in compat.state_dict(unet).items()] == [(k, list(s)) for k, s in
                                                                               meta["state_dict"]]
    assert unet.config.architecture() == original.config.architecture()
    assert unet.conditions["appearance"].dropout == 0.5  # p_image_zero


# ---------------------------------------------------------------------------------------------- identity at init
VARIANTS = {
    "joint": ({**TINY, **JOINT}, 3, (8, 8)),
    "attention_at_levels_3_levels_non_square": (
        {**TINY, **JOINT, "dim_mult": [1, 2, 2], "attn_scales": [1.0, 0.5, 0.25]}, 2, (8, 12)),
    "single_frame": ({**TINY, **JOINT, "attn_scales": [1.0]}, 1, (6, 10)),
    "five_frames_serial": ({**TINY, "spatial_adapter_list": ["self_attention", "feedforward"],
                            "spatial_adapter_position_list": ["serial", "", "parallel"],
                            "temporal_adapter_list": ["cross_attention"],
                            "temporal_adapter_position_list": ["", "serial", ""],
                            "temporal_adapter_condition_dim": 64, "attn_scales": [0.5]}, 5, (8, 8)),
    "spatial_only": ({**TINY, "spatial_adapter_list": ["self_attention", "cross_attention", "feedforward"],
                      "spatial_adapter_position_list": ["parallel", "parallel", "parallel"],
                      "spatial_adapter_hidden_dim": 8, "attn_scales": [1.0]}, 2, (8, 8)),
    "temporal_only_unconditioned": ({**TINY, "temporal_adapter_list": ["self_attention", "feedforward"],
                                     "temporal_adapter_hidden_dim": 4, "num_heads": 1}, 4, (4, 8)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_adapters_are_the_identity_at_initialisation(name):
    kwargs, frames, size = VARIANTS[name]
    model, base = _adapted_and_base(kwargs)
    x, t, y, image = _inputs(frames, size)
    with torch.no_grad():
        adapted = compat.forward(model, x, t, y=y, y_image=image, ag_strength=0.7)
        plain = compat.forward(base, x, t, y=y)
    assert torch.equal(adapted, plain)
    # ... and every adapter takes part once trained (non-zero up projections change the output)
    names = adapter_parameter_names(model, model.vgen_adapters)
    assert names and all(n.endswith(("weight", "bias")) for n in names)
    _randomise(model, set(names), std=0.2, seed=3)
    with torch.no_grad():
        assert not torch.equal(compat.forward(model, x, t, y=y, y_image=image, ag_strength=0.7), plain)


def test_position_none_builds_the_weights_but_leaves_the_sub_layer_alone():
    """An adapter listed at a sub-layer whose original position is '' (not parallel/serial) is built, not applied."""
    kwargs = {**TINY, "spatial_adapter_list": ["self_attention"], "attn_scales": [1.0]}  # default positions ['', ...]
    model, base = _adapted_and_base(kwargs)
    assert model.vgen_adapters["identity"].sublayers == {"self_attention": "none"}
    _randomise(model, set(adapter_parameter_names(model, model.vgen_adapters)), seed=4)
    x, t, y, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(compat.forward(model, x, t, y=y), compat.forward(base, x, t, y=y))


def test_gradient_checkpointing_recomputes_the_adapters_alike():
    model, _ = _adapted_and_base({**TINY, **JOINT, "attn_scales": [1.0]})
    _randomise(model, set(adapter_parameter_names(model, model.vgen_adapters)), std=0.2, seed=5)
    x, t, y, image = _inputs()
    results = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(enabled)
        out = compat.forward(model, x, t, y=y, y_image=image, ag_strength=0.5)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- adapters on our UNet
def _base_unet(seed=0):
    """The bare UNet of the tiny joint network (T2V trunk, text, the appearance condition 64 wide), no adapters."""
    model = UNet3D(compat.unet_config_from_original("UNetSD_DreamVideo", {**TINY, **JOINT, "attn_scales": [1.0]}))
    assert not any(isinstance(m, BottleneckAdapter) for m in model.modules())
    _randomise(model, seed=seed)
    return model.eval()


def test_adapter_only_save_and_load_round_trip(tmp_path):
    model = _base_unet()
    identity, motion = IdentityAdapter(), MotionAdapter()
    identity.apply(model)
    motion.apply(model)
    _randomise(model, set(adapter_parameter_names(model, {"i": identity, "m": motion})), std=0.2, seed=7)
    identity.save_weights(model, tmp_path / "identity.safetensors")
    motion.save_weights(model, tmp_path / "motion.safetensors")
    with safe_open(str(tmp_path / "identity.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(identity.parameter_names(model))
        assert f.metadata()["class"] == "vgen.models.dreamvideo.IdentityAdapter"
    with safe_open(str(tmp_path / "motion.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sorted(keys) == sorted(motion.parameter_names(model)) and all("_adapter." in k for k in keys)

    fresh = _base_unet()  # the same base weights (same seed)
    IdentityAdapter(weights=str(tmp_path / "identity.safetensors")).apply(fresh)
    second = MotionAdapter()
    second.apply(fresh)
    second.load_weights(fresh, tmp_path / "motion.safetensors")
    x, t, y, image = _inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, text=y, appearance=image), model(x, t, text=y, appearance=image))
    with pytest.raises(KeyError, match="missing"):  # the identity file holds none of the motion adapter's weights
        second.load_weights(fresh, tmp_path / "identity.safetensors")
    save_file({"time_embed.0.weight": torch.zeros(1)}, str(tmp_path / "not_adapters.safetensors"))
    with pytest.raises(KeyError, match="not a file of DreamVideo adapter weights"):
        second.load_weights(fresh, tmp_path / "not_adapters.safetensors")
    # a VGen-style file with both adapters' weights (original key names): each adapter takes its own
    torch.save({"state_dict": {**identity.state_dict(model), **motion.state_dict(model)}}, tmp_path / "joint.pth")
    third = _base_unet()
    for adapter in (IdentityAdapter(), MotionAdapter()):
        adapter.apply(third)
        adapter.load_weights(third, tmp_path / "joint.pth")
    with torch.no_grad():
        assert torch.equal(third(x, t, text=y, appearance=image), model(x, t, text=y, appearance=image))


def test_composed_adapters_are_the_original_joint_network_and_disable_one_by_one():
    model = _base_unet()
    identity, motion = IdentityAdapter(), MotionAdapter()
    spatial = identity.apply(model)
    assert spatial == ["input_blocks.1.1.transformer_blocks.0", "middle_block.1.transformer_blocks.0",
                       "output_blocks.2.1.transformer_blocks.0", "output_blocks.3.1.transformer_blocks.0"]
    assert motion.apply(model)[0] == "input_blocks.0.1.transformer_blocks.0"  # the one after the input conv too
    both = {"identity": identity, "motion": motion}
    _randomise(model, set(adapter_parameter_names(model, both)), std=0.2, seed=8)
    original = compat.build_unet("UNetSD_DreamVideo", {**TINY, **JOINT, "attn_scales": [1.0]}).eval()
    compat.load_state_dict(original, compat.state_dict(model))  # the same keys: strict
    x, t, y, image = _inputs()
    with torch.no_grad():
        composed = model(x, t, text=y, appearance=image, appearance_strength=torch.tensor([1.0, 0.3]))
        reference = torch.cat([compat.forward(original, x[i:i + 1], t[i:i + 1], y=y[i:i + 1], y_image=image[i:i + 1],
                                              ag_strength=s) for i, s in enumerate((1.0, 0.3))])
        # per-sample strengths in one batch = one sample at a time (to float32 rounding of other batch shapes)
        torch.testing.assert_close(composed, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
        with identity.disabled(model):
            motion_only = model(x, t, text=y, appearance=image)
        with motion.disabled(model):
            identity_only = model(x, t, text=y, appearance=image)
            with identity.disabled(model):
                none = model(x, t, text=y, appearance=image)
        bare = _base_unet()(x, t, text=y, appearance=image)
    assert torch.equal(none, bare)
    assert len({composed.sum().item(), motion_only.sum().item(), identity_only.sum().item(), none.sum().item()}) == 4
    with pytest.raises(ValueError, match="already have an adapter"):
        MotionAdapter(sublayers=["feedforward"]).apply(model)


def test_only_the_adapters_train_and_the_base_stays_bit_exact():
    model = _base_unet().train()
    adapters = {"identity": IdentityAdapter(), "motion": MotionAdapter()}
    for adapter in adapters.values():
        adapter.apply(model)
    names = set(adapter_parameter_names(model, adapters))
    count = mark_only_adapters_trainable(model, adapters)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in names)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in names}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, t, y, image = _inputs()
    for _ in range(3):
        optimizer.zero_grad()
        model(x, t, text=y, appearance=image).square().mean().backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)


@pytest.mark.parametrize("rule", ["zeros", "drop"])
def test_a_dropped_appearance_condition_gives_its_projection_no_gradient(rule):
    """Classifier-free dropout of the appearance condition (VGen p_image_zero) through the generic registry: with
    ``zeros`` (VGen's zero vector) W_c gets no gradient, with ``drop`` neither W_c nor its bias does; kept, both do."""
    model = _base_unet()
    motion = MotionAdapter()
    motion.apply(model)
    _randomise(model, set(motion.parameter_names(model)), std=0.2, seed=9)
    condition = model.conditions["appearance"]
    condition.drop_to = rule
    x, t, y, image = _inputs()
    grads = {}
    for p_image_zero in (1.0, 0.0):
        condition.dropout = p_image_zero
        values = {"text": y, "appearance": image}
        masks = dropout_masks(model.conditions, ["appearance"], x.shape[0], x.device)
        inputs = apply_dropout(model.conditions, values, masks, encoders=None)
        model.zero_grad()
        model(x, t, **inputs).square().mean().backward()
        grads[p_image_zero] = {n: p.grad for n, p in model.named_parameters() if ".condition_linear." in n}
    assert len(grads[0.0]) == 2 * len(motion.modules(model))
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0.0].values())
    for name, grad in grads[1.0].items():
        if rule == "drop" or name.endswith("weight"):
            assert grad is None or not grad.any(), name
        else:
            assert grad.abs().sum() > 0, name  # VGen's zero vector still passes the bias


def test_motion_adapter_needs_its_condition_in_the_unet():
    model = compat.build_unet("UNetSD_T2VBase", {**TINY, "attn_scales": [1.0]})
    with pytest.raises(ValueError, match="appearance"):
        MotionAdapter().apply(model)
    MotionAdapter(condition=None, strength=None).apply(model)  # unconditioned temporal adapters
    with pytest.raises(ValueError, match="sublayers"):
        IdentityAdapter(sublayers=["cross_attn"])
    with pytest.raises(ValueError, match="positions"):
        IdentityAdapter(sublayers={"cross_attention": "beside"})
    with pytest.raises(ValueError, match="condition_dim"):
        MotionAdapter(condition_dim=32).apply(_base_unet())
