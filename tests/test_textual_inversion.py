"""Textual inversion in the OpenCLIP text encoder: one learned token row, saved and loaded alone (tiny CLIP on CPU)."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from vgen.models.text_encoder import OpenCLIPTextEncoder

CAPTIONS = ["a * on the beach", "a photo of a cat", "a * ."]


@pytest.fixture(scope="module")
def base_encoding():
    return OpenCLIPTextEncoder("tiny")(CAPTIONS)


def _train_steps(encoder: OpenCLIPTextEncoder, steps: int = 2) -> None:
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    target = torch.randn(2, encoder.max_length, encoder.dim, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = (encoder(["a * on the beach", "a photo of a cat"]) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_only_the_placeholder_row_trains_and_everything_else_stays_bit_identical():
    encoder = OpenCLIPTextEncoder("tiny")
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}
    placeholder = encoder.add_placeholder("*", "dog")
    assert [n for n, p in encoder.named_parameters() if p.requires_grad] == ["placeholder.embedding"]
    assert not encoder.token_embedding.weight.requires_grad
    start = placeholder.embedding.detach().clone()
    dog = encoder._base_tokenizer.encode("dog")[0]
    assert torch.equal(start, encoder.token_embedding.weight[dog])
    encoder.train()
    assert not encoder.training  # FrozenModule: eval for good
    _train_steps(encoder)
    assert not torch.equal(placeholder.embedding, start)
    for key, value in frozen.items():
        assert torch.equal(encoder.state_dict()[key], value), key  # incl. the base table's own "*" row


def test_a_fresh_placeholder_encodes_like_its_initializer_word():
    encoder = OpenCLIPTextEncoder("tiny")
    encoder.add_placeholder("*", "dog")
    with_placeholder = encoder(["a * on the beach"])
    encoder.remove_placeholder()
    assert torch.equal(with_placeholder, encoder(["a dog on the beach"]))


def test_captions_without_the_placeholder_encode_exactly_as_the_base(base_encoding):
    encoder = OpenCLIPTextEncoder("tiny")
    encoder.add_placeholder("*", "dog")
    _train_steps(encoder)
    out = encoder(CAPTIONS)
    assert torch.equal(out[1], base_encoding[1])  # "a photo of a cat": no placeholder
    assert not torch.equal(out[0], base_encoding[0])


def test_save_and_load_round_trip_reproduces_the_encoding(tmp_path):
    encoder = OpenCLIPTextEncoder("tiny")
    encoder.add_placeholder("*", "dog")
    _train_steps(encoder)
    path = encoder.save_placeholder(tmp_path / "subject.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["subject.safetensors"]  # no leftover temporary file
    loaded = OpenCLIPTextEncoder("tiny")
    placeholder = loaded.load_placeholder(path)
    assert (placeholder.token, placeholder.init_word) == ("*", "dog")
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for sampling: frozen
    assert torch.equal(loaded(CAPTIONS), encoder(CAPTIONS))
    assert loaded.load_placeholder(path, trainable=True).embedding.requires_grad


def test_a_word_that_is_not_one_clip_token_becomes_a_new_token(tmp_path, base_encoding):
    encoder = OpenCLIPTextEncoder("tiny")
    assert len(encoder._base_tokenizer.encode("<sks>")) > 1
    placeholder = encoder.add_placeholder("<SKS>", "dog")  # matched in any case: captions are lower-cased
    assert placeholder.token == "<sks>" and placeholder.token_id == encoder.token_embedding.num_embeddings
    dog = OpenCLIPTextEncoder("tiny")(["a dog on the beach"])
    assert torch.equal(encoder(["a <Sks> on the beach"]), dog)
    assert torch.equal(encoder(CAPTIONS), base_encoding)  # "*" is an ordinary token again
    encoder(["a <sks> on the beach"]).square().mean().backward()
    assert placeholder.embedding.grad is not None and placeholder.embedding.grad.abs().sum() > 0
    loaded = OpenCLIPTextEncoder("tiny")
    loaded.load_placeholder(encoder.save_placeholder(tmp_path / "sks.safetensors"))
    assert torch.equal(loaded(["a <sks> on the beach"]), dog)


def test_placeholder_glued_to_punctuation_warns_once(caplog):
    encoder = OpenCLIPTextEncoder("tiny")
    encoder.add_placeholder("*", "dog")
    with caplog.at_level(logging.WARNING, logger="vgen.models.text_encoder"):
        encoder(["a *.", "a * ."])
        encoder(["a *."])
    assert len([r for r in caplog.records if "placeholder" in r.getMessage()]) == 1
    assert "'a *.'" in caplog.records[0].getMessage()


def test_bad_placeholders_and_files_fail_with_one_line_naming_them(tmp_path):
    encoder = OpenCLIPTextEncoder("tiny")
    with pytest.raises(ValueError, match="initializer word 'golden retriever' is 2 CLIP tokens"):
        encoder.add_placeholder("*", "golden retriever")
    with pytest.raises(ValueError, match="placeholder 'my dog' is not one CLIP token"):
        encoder.add_placeholder("my dog", "dog")
    with pytest.raises(ValueError, match="no placeholder to save"):
        encoder.save_placeholder(tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        encoder.load_placeholder(tmp_path / "missing.safetensors")
    cases = {
        "wide.safetensors": ({"embedding": torch.zeros(32)}, {"token": "*"}, r"shape \(32,\) does not fit .*width 64"),
        "nokey.safetensors": ({"string_to_param": torch.zeros(64)}, {"token": "*"}, "no 'embedding' tensor"),
        "notoken.safetensors": ({"embedding": torch.zeros(64)}, {}, "no 'token' in the file's metadata"),
    }
    for name, (tensors, metadata, message) in cases.items():
        save_file(tensors, str(tmp_path / name), metadata=metadata)
        with pytest.raises(ValueError, match=message) as err:
            encoder.load_placeholder(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name)) and "\n" not in str(err.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        encoder.load_placeholder(tmp_path / "junk.safetensors")
    assert encoder.placeholder is None


def test_stage_recipe_trains_only_the_row_through_a_frozen_unet_and_the_masked_loss():
    """What a textual-inversion stage does (vgen.models.textual_inversion): frozen UNet and encoder, placeholder
    added afterwards, captions encoded with grad, DreamVideo's masked eps loss."""
    from vgen.diffusion import build_diffusion
    from vgen.diffusion.loss import latent_mask
    from vgen.models import UNet3D

    torch.manual_seed(0)
    unet = UNet3D(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_scales=(1.0,), head_dim=16, init_temporal_heads=2, context_dim=64, decoder_context_dim=64)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    unet.requires_grad_(False)
    encoder = OpenCLIPTextEncoder("tiny")
    encoder.requires_grad_(False)  # as DiffusionStage leaves it
    placeholder = encoder.add_placeholder("*", "dog")
    frozen = {**{f"unet.{k}": v.clone() for k, v in unet.state_dict().items()},
              **{k: v.clone() for k, v in encoder.state_dict().items() if not k.startswith("placeholder.")}}
    optimizer = torch.optim.AdamW(placeholder.parameters(), lr=1e-3)
    diffusion = build_diffusion(schedule="linear_sd", prediction="eps")
    latents = torch.rand(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pixel_mask = torch.zeros(2, 1, 1, 32, 32)
    pixel_mask[..., 8:24, 8:24] = 1
    start = placeholder.embedding.detach().clone()
    for _ in range(2):
        text = encoder(["a * on the beach", "a photo of *"])
        loss = diffusion.loss(unet, latents, {"text": text}, loss_mask=latent_mask(pixel_mask, latents)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(placeholder.embedding, start)
    now = {**{f"unet.{k}": v for k, v in unet.state_dict().items()}, **encoder.state_dict()}
    assert all(torch.equal(now[k], v) for k, v in frozen.items())
