"""VideoComposer condition extractors (vgen.data.conditions): motion vectors from real encoded video, edges and
sketches on rendered shapes, PiDiNet / sketch simplifier / DPT depth through their real loading code with tiny
random weights, masks, the masked video, the palette histogram and the first-frame maps."""

from __future__ import annotations

import io
import math
import pickle

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vgen.checkpoint.safe_load import CheckpointError
from vgen.data.conditions import (
    PALETTE_BINS,
    PiDiNet,
    SketchSimplifier,
    canny_edges,
    first_frame_map,
    load_pidinet,
    load_sketch_simplifier,
    masked_video,
    motion_vectors,
    motion_vectors_from_frames,
    palette_histogram,
    pidinet_sketch,
    random_mask,
    rasterise_vectors,
    single_sketch,
    sketch,
)
from vgen.data.conditions.pidinet import BLOCKS, CARV4, pdc_kernel
from vgen.data.synthetic import BACKGROUND, COLORS, render_frame
from vgen.data.video import encode_video

SIZE = 64


def moving_square(dx: int, dy: int, frames: int = 12, speed: int = 2, side: int = 17):
    """A textured square moving (dx, dy) * speed px per frame on a flat background -> (uint8 frames, masks)."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    texture = np.stack([((xs // 3 + ys // 3) % 2) * 80 + 150, ((xs // 3 + ys // 3) % 2) * 40 + 75,
                        np.full_like(xs, 60)], axis=-1).astype(np.uint8)
    start = np.array([SIZE / 2, SIZE / 2]) - np.array([dx, dy]) * speed * (frames - 1) / 2
    video = np.empty((frames, SIZE, SIZE, 3), np.uint8)
    masks = np.empty((frames, SIZE, SIZE), bool)
    for t in range(frames):
        cx, cy = start + np.array([dx, dy]) * speed * t
        masks[t] = (np.abs(xs + 0.5 - cx) <= side / 2) & (np.abs(ys + 0.5 - cy) <= side / 2)
        video[t] = BACKGROUND
        video[t][masks[t]] = texture[masks[t]]
    return video, masks


def mean_direction(field: torch.Tensor, masks: np.ndarray) -> tuple[float, float]:
    """(angle in degrees, length) of the mean vector of a [2, F, H, W] field over the masked pixels."""
    mask = torch.from_numpy(masks[: field.shape[1]])
    mean = torch.stack([field[c][mask] for c in range(2)]).mean(1)
    return math.degrees(math.atan2(mean[1], mean[0])), float(mean.norm())


def angle_error(angle: float, want: float) -> float:
    return abs((angle - want + 180) % 360 - 180)


# --- motion vectors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reencode", [True, False], ids=["mpeg4", "h264_own"])
@pytest.mark.parametrize("direction", [(1, 0), (0, 1), (-1, 0)], ids=["right", "down", "left"])
def test_motion_vectors_of_real_mp4_follow_the_square(direction, reencode):
    frames, masks = moving_square(*direction)
    data = encode_video(frames, fps=8)  # a real H.264 mp4 (libx264, with B-frames)
    field = motion_vectors(data, len(frames), None, reencode=reencode, motion_scale=1.0)
    assert field.shape == (2, len(frames), SIZE, SIZE) and field.dtype == torch.float32
    assert torch.equal(field[:, 0], torch.zeros_like(field[:, 0]))  # the first (intra) frame has no vectors
    angle, length = mean_direction(field, masks)
    want = math.degrees(math.atan2(direction[1], direction[0]))
    assert angle_error(angle, want) < 20, (angle, want)
    assert length > 0.3  # it moves 2 px per frame; blocks straddling the background dilute the mean
    # Away from the square (a macroblock or more from any of its positions) the background stays (nearly) still.
    near = F.max_pool2d(torch.from_numpy(masks.any(0)).float()[None, None], 33, stride=1, padding=16)[0, 0]
    assert field[:, :, near == 0].abs().mean() < 0.1 * length


def test_motion_vectors_resize_scale_and_fps():
    frames, masks = moving_square(1, 0, frames=12)
    data = encode_video(frames, fps=8)
    native = motion_vectors(data, 12, None, motion_scale=1.0)
    scaled = motion_vectors(data, 12, None)  # default motion_scale 4
    torch.testing.assert_close(scaled, native / 4)
    small = motion_vectors(data, 12, (32, 16), motion_scale=1.0)  # [width, height]: half the width, crop height
    assert small.shape == (2, 12, 16, 32)
    # halved and centre-cropped like the frames, the vectors counted in output pixels: half as long
    assert 0.4 < small[0].mean() / native[0, :, 16:48].mean() < 0.6
    # fps 4 of an 8 fps video: every 2nd frame, so about twice the motion per sampled frame.
    sampled = motion_vectors(data, 6, None, fps=4, motion_scale=1.0)
    assert sampled.shape == (2, 6, SIZE, SIZE)
    angle, length = mean_direction(sampled, masks[::2])
    assert angle_error(angle, 0) < 20 and length > 1.5 * mean_direction(native, masks)[1]
    # which is the re-encoding of the decoded frames, passed as frames
    with av.open(io.BytesIO(data)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])
    torch.testing.assert_close(motion_vectors_from_frames(decoded[::2], motion_scale=1.0), sampled)


def test_motion_vectors_window_and_errors():
    frames, _ = moving_square(1, 0, frames=8)
    data = encode_video(frames, fps=8)
    window = motion_vectors(data, 3, None, start=4, reencode=False)
    torch.testing.assert_close(window, motion_vectors(data, None, None, reencode=False)[:, 4:7])
    with pytest.raises(ValueError, match="num_frames=9"):
        motion_vectors(data, 9, None)
    with pytest.raises(ValueError, match="reencode=True"):
        motion_vectors(data, 4, None, fps=4, reencode=False)
    with pytest.raises(ValueError, match="not decodable"):
        motion_vectors(b"not a video at all", 2, None)
    with pytest.raises(TypeError, match="bytes"):
        motion_vectors("video.mp4", 2, None)
    with pytest.raises(ValueError, match="motion_scale"):
        motion_vectors(data, 2, None, motion_scale=0)


def test_rasterise_vectors_sign_and_block():
    fields = ["source", "w", "h", "src_x", "src_y", "dst_x", "dst_y", "flags", "motion_x", "motion_y",
              "motion_scale"]
    dtype = np.dtype([(name, np.int32) for name in fields])
    # A past-referenced 8x8 block now centred at (12, 4) whose content was 2 px to the left: moved +2 in x.
    # A future-referenced block whose content will be 3 px lower: moves +3 in y.
    vectors = np.array([(-1, 8, 8, 10, 4, 12, 4, 0, -8, 0, 4), (1, 8, 8, 4, 15, 4, 12, 0, 0, 12, 4)], dtype=dtype)
    field = rasterise_vectors(vectors, 16, 16)
    assert field.shape == (2, 16, 16)
    assert np.all(field[0, 0:8, 8:16] == 2) and np.all(field[1, 0:8, 8:16] == 0)
    assert np.all(field[1, 8:16, 0:8] == 3) and np.all(field[0, 8:16, 0:8] == 0)
    assert field[:, 0:8, 0:8].max() == 0 and field[:, 8:, 8:].max() == 0


# --- edges and sketches ----------------------------------------------------------------------------------------


def rendered_shapes():
    return np.stack([render_frame("red", "circle", (32, 30), 14, SIZE), render_frame("blue", "square", (30, 34), 16, SIZE),
                     render_frame("green", "triangle", (31, 33), 16, SIZE)])


def outline_distance(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance of every pixel to the shape's boundary in px, the shape's outline pixels) of a rendered frame."""
    inside = np.abs(frame.astype(int) - np.array(BACKGROUND)).max(-1) > 10
    outline = np.zeros_like(inside)
    for axis in (0, 1):
        change = np.diff(inside, axis=axis)
        index = [slice(None), slice(None)]
        index[axis] = slice(0, -1)
        outline[tuple(index)] |= change
        index[axis] = slice(1, None)
        outline[tuple(index)] |= change
    ys, xs = np.nonzero(outline)
    gy, gx = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]]
    distance = np.sqrt((gy[..., None] - ys) ** 2 + (gx[..., None] - xs) ** 2).min(-1)
    return distance, outline & inside


@pytest.mark.parametrize("extractor", [sketch, canny_edges], ids=["sketch", "canny"])
def test_edges_lie_on_the_outline(extractor):
    frames = rendered_shapes()
    maps = extractor(frames)
    assert maps.shape == (1, 3, SIZE, SIZE) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    if extractor is canny_edges:
        assert set(maps.unique().tolist()) <= {0.0, 1.0}
    for index, frame in enumerate(frames):
        distance, outline = outline_distance(frame)
        edges = maps[0, index].numpy()
        assert edges[distance <= 1.5].sum() >= 0.95 * edges.sum()  # the edge mass lies on the outline
        assert (edges[distance > 3] > 0.05).mean() < 0.005  # inside and outside, far from it, is empty
        near = F.max_pool2d(torch.from_numpy(edges)[None, None], 3, stride=1, padding=1)[0, 0].numpy()
        assert (near[outline] > 0.3).mean() > 0.9  # and the whole outline is drawn
    if extractor is sketch:
        assert maps.max() > 0.8  # full-contrast outlines are strong


def test_edges_of_a_flat_frame_are_empty_and_bad_frames_are_named():
    flat = np.full((2, 16, 16, 3), 120, np.uint8)
    assert sketch(flat).max() == 0 and canny_edges(flat).max() == 0
    with pytest.raises(ValueError, match="frames must be uint8"):
        sketch(np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="low_threshold"):
        canny_edges(flat, low_threshold=0.3, high_threshold=0.2)


# --- PiDiNet and the sketch simplifier ---------------------------------------------------------------------------


def test_pixel_difference_kernels_match_their_definitions():
    torch.manual_seed(0)
    x, w = torch.randn(1, 2, 9, 9), torch.randn(2, 1, 3, 3)
    taps = F.unfold(x, 3, padding=1).view(1, 2, 9, 81)  # 3x3 neighbourhood of every pixel, raster order
    weights = w.view(2, 9)

    def plain(kind):
        kernel = pdc_kernel(kind, w)
        return F.conv2d(x, kernel, padding=kernel.shape[-1] // 2, groups=2).view(1, 2, 81)

    central = (weights.view(1, 2, 9, 1) * (taps - taps[:, :, 4:5])).sum(2)
    ring = (0, 1, 2, 5, 8, 7, 6, 3)  # clockwise from the top-left
    angular = sum(weights[:, i].view(1, 2, 1) * (taps[:, :, i] - taps[:, :, ring[(k + 1) % 8]])
                  for k, i in enumerate(ring))
    taps5 = F.unfold(x, 5, padding=2).view(1, 2, 25, 81)
    outer, inner = (0, 2, 4, 10, 14, 20, 22, 24), (6, 7, 8, 11, 13, 16, 17, 18)
    radial = sum(weights[:, 1 + k].view(1, 2, 1) * (taps5[:, :, o] - taps5[:, :, i])
                 for k, (o, i) in enumerate(zip(outer, inner)))
    torch.testing.assert_close(plain("cd"), central, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain("ad"), angular, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain("rd"), radial, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain("cv"), F.conv2d(x, w, padding=1, groups=2).view(1, 2, 81))


def released_pidinet_state(channels=4, dilation=2, seed=0) -> dict[str, torch.Tensor]:
    """Random weights in the released table5_pidinet layout: pixel-difference form (every block conv 3x3)."""
    torch.manual_seed(seed)
    model = PiDiNet(channels, dilation)
    state = {k: torch.randn_like(v) * 0.3 for k, v in model.state_dict().items()}
    for name, _ in BLOCKS:
        key = f"{name}.conv1.weight"
        state[key] = torch.randn(state[key].shape[0], 1, 3, 3) * 0.3
    return state


def test_full_size_networks_have_the_released_layout():
    assert sum(p.numel() for p in PiDiNet().parameters()) == 720_709  # table5_pidinet: the paper gives ~0.71M
    keys = PiDiNet().state_dict().keys()
    assert {"init_block.weight", "block2_1.shortcut.bias", "dilations.3.conv2_4.weight", "attentions.0.conv2.weight",
            "conv_reduces.3.conv.bias", "classifier.weight"} <= set(keys)
    simplifier = SketchSimplifier()
    assert [k for k in simplifier.state_dict()][:2] == ["layers.0.weight", "layers.0.bias"]
    assert simplifier.state_dict()["layers.44.weight"].shape == (1, 24, 3, 3)


def test_pidinet_loads_released_layout_and_converted_weights(tmp_path):
    state = released_pidinet_state()
    released = tmp_path / "table5_pidinet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, released)
    model = load_pidinet(released)
    assert (model.channels, model.dilation, model.attention) == (4, 2, True)
    assert model.block1_2.conv1.weight.shape == (4, 1, 5, 5)  # rd: converted to a plain 5x5 kernel
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # weights already converted (rd 5x5) load as they are, from safetensors, and give the same network
    converted = tmp_path / "pidinet_plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(converted))
    frames = np.random.default_rng(0).integers(0, 256, (3, 20, 28, 3), dtype=np.uint8)
    sketches = pidinet_sketch(frames, model)
    assert sketches.shape == (1, 3, 20, 28) and sketches.min() >= 0 and sketches.max() <= 1
    torch.testing.assert_close(pidinet_sketch(frames, load_pidinet(converted)), sketches)
    # the conversion is the pixel-difference definition: the first (cd) conv of the loaded model
    torch.testing.assert_close(model.init_block.weight, pdc_kernel(CARV4[0], state["init_block.weight"]))


def test_sketch_simplifier_loads_and_post_processes(tmp_path):
    torch.manual_seed(1)
    simplifier = SketchSimplifier(divisor=8)
    path = tmp_path / "sketch_simplification_gan.pth"
    torch.save({k: torch.randn_like(v) * 0.05 for k, v in simplifier.state_dict().items()}, path)
    loaded = load_sketch_simplifier(path)
    assert loaded.divisor == 8 and loaded.layers[0].out_channels == 6
    pidinet = load_pidinet(_save(tmp_path / "p.safetensors", released_pidinet_state()))
    frames = np.random.default_rng(1).integers(0, 256, (2, 21, 30, 3), dtype=np.uint8)  # not multiples of 8
    cleaned = pidinet_sketch(frames, pidinet, loaded)
    assert cleaned.shape == (1, 2, 21, 30) and cleaned.min() >= 0 and cleaned.max() <= 1
    # 1 - simplifier(1 - edges), the input padded with white to 24 x 32
    edges = pidinet_sketch(frames, pidinet)[0][:, None]
    with torch.no_grad():
        want = 1 - loaded(F.pad(1 - edges, (0, 2, 0, 3), value=1.0))[..., :21, :30]
    torch.testing.assert_close(cleaned[0][:, None], want)
    torch.testing.assert_close(single_sketch(cleaned), cleaned[:, :1].expand(-1, 2, -1, -1))


def _save(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weight_loaders_refuse_pickles_and_name_bad_files(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"init_block.weight": _RunsCode()}}, f)
    with pytest.raises(CheckpointError, match="evil.pth.*refused"):
        load_pidinet(evil)
    assert "this must never run" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_pidinet(tmp_path / "missing.safetensors")
    state = released_pidinet_state()
    del state["classifier.bias"]
    with pytest.raises(ValueError, match=r"partial.safetensors.*missing: classifier.bias"):
        load_pidinet(_save(tmp_path / "partial.safetensors", state))
    with pytest.raises(ValueError, match="other.safetensors: not a sketch-simplifier"):
        load_sketch_simplifier(_save(tmp_path / "other.safetensors", released_pidinet_state()))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_pidinet(garbage)


# --- depth -------------------------------------------------------------------------------------------------------


def tiny_dpt(folder):
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                       image_size=32, patch_size=16, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3])
    torch.manual_seed(0)
    model = DPTForDepthEstimation(config)
    with torch.no_grad():
        for parameter in model.head.parameters():  # push the random head's ReLU output well above 0
            parameter.add_(0.5)
    model.save_pretrained(str(folder))
    return model


def test_depth_estimator_from_a_tiny_random_dpt(tmp_path):
    from vgen.data.conditions import depth_map, load_depth_estimator

    tiny_dpt(tmp_path / "dpt")
    frames = np.random.default_rng(0).integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)
    estimator = load_depth_estimator(tmp_path / "dpt")
    assert estimator.input_size == 32 and not estimator.training
    depth = depth_map(frames, estimator)
    assert depth.shape == (1, 3, 24, 40) and depth.dtype == torch.float32
    assert depth.min() >= 0 and depth.max() <= 10 and depth.std() > 0
    # the weights file alone (config.json beside it) loads strictly too; normalize=True divides by depth_clamp
    single = load_depth_estimator(tmp_path / "dpt" / "model.safetensors", normalize=True)
    torch.testing.assert_close(depth_map(frames, single) * 10, depth)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_depth_estimator(_save(tmp_path / "alone.safetensors", {"x": torch.zeros(1)}))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "dpt" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"bad.model.safetensors: does not match"):
        load_depth_estimator(_save(tmp_path / "bad" / "model.safetensors", {"x": torch.zeros(1)}))


def test_depth_normalisation_is_videocomposers():
    from vgen.data.conditions import DepthEstimator, depth_map

    class Constant(torch.nn.Module):  # "depth" = 300 x the red channel of the [-1, 1] input
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, pixel_values):
            return type("Out", (), {"predicted_depth": 300 * pixel_values[:, 0]})()

    frames = np.zeros((3, 16, 16, 3), np.uint8)
    frames[:, :, :, 0] = np.array([0, 153, 255], np.uint8)[:, None, None]  # red 0, 0.6, 1.0 -> input -1, 0.2, 1
    depth = depth_map(frames, DepthEstimator(Constant(), input_size=32))
    # (prediction / 20).clamp(0, 10): -300/20 -> 0, 60/20 = 3, 300/20 = 15 -> 10
    torch.testing.assert_close(depth[0, :, 0, 0], torch.tensor([0.0, 3.0, 10.0]), atol=1e-3, rtol=0)


# --- masks, masked video, palette, first frame ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["strokes", "rectangles", "uncrop", None])
def test_random_masks(kind):
    masks = [random_mask(48, 80, kind, generator=seed) for seed in range(40)]
    for mask in masks:
        assert mask.shape == (1, 48, 80) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    fractions = torch.stack([m.mean() for m in masks])
    assert (fractions > 0).all() and (fractions < 1).all()
    assert len({m.numpy().tobytes() for m in masks}) > 3  # different draws differ
    torch.testing.assert_close(random_mask(48, 80, kind, generator=7), random_mask(48, 80, kind, generator=7))
    if kind == "uncrop":
        assert (fractions == 0.5).all()
        for mask in masks:  # one half: constant along one axis
            m = mask[0]
            assert (m == m[:1]).all() or (m == m[:, :1]).all()
    if kind == "rectangles":
        for mask in masks:
            m = mask[0].bool()
            # boxes keep 10 of the 512 canvas px from the border: the outermost pixel centres stay clear
            assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


def test_random_mask_kinds_are_drawn_in_proportion():
    rng = np.random.default_rng(0)
    halves = sum(float(random_mask(32, 32, generator=rng).mean()) == 0.5 for _ in range(400))
    assert 20 <= halves <= 70  # uncrop 10% (strokes and boxes almost never cover exactly half)


def test_masked_video():
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    mask = torch.zeros(1, 8, 10)
    mask[:, 2:5, 3:9] = 1
    video = masked_video(frames, mask)
    assert video.shape == (4, 3, 8, 10)
    keep = (1 - mask).expand(3, 8, 10)
    torch.testing.assert_close(video[3], keep)
    original = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(video[:3], original * keep)
    assert video[:3, :, 2:5, 3:9].abs().max() == 0
    torch.testing.assert_close(masked_video(frames, mask.expand(3, 8, 10)), video)  # per-frame masks
    with pytest.raises(ValueError, match="mask must be"):
        masked_video(frames, torch.zeros(1, 8, 9))


def test_palette_histogram():
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    frames[0] = COLORS["red"]
    frames[1, :, :4], frames[1, :, 4:] = COLORS["red"], COLORS["blue"]
    frames[2, :4], frames[2, 4:] = (0, 0, 0), (128, 128, 128)
    hist = palette_histogram(frames)
    assert hist.shape == (3, PALETTE_BINS) == (3, 156) and hist.dtype == torch.float32
    torch.testing.assert_close(hist.sum(1), torch.ones(3))
    red = int(hist[0].argmax())
    assert hist[0, red] == 1 and red >= 12  # a colour bin
    assert hist[1, red] == 0.5 and sorted(hist[1][hist[1] > 0].tolist()) == [0.5, 0.5]
    grey = hist[2].nonzero().flatten().tolist()
    assert len(grey) == 2 and all(b < 12 for b in grey)  # black and mid-grey: two different grey bins
    bins = {int(palette_histogram(np.full((1, 2, 2, 3), c, np.uint8))[0].argmax()) for c in COLORS.values()}
    assert len(bins) == len(COLORS)  # the demo's colours are told apart
    with pytest.raises(ValueError, match="bins must be 156"):
        palette_histogram(frames, bins=64)


def test_first_frame_and_single_sketch():
    frames = np.random.default_rng(0).integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    local = first_frame_map(frames)
    assert local.shape == (3, 4, 6, 5) and local.min() >= 0 and local.max() <= 1
    first = torch.from_numpy(frames[0]).permute(2, 0, 1).float() / 255
    for t in range(4):
        torch.testing.assert_close(local[:, t], first)
    torch.testing.assert_close(first_frame_map(torch.from_numpy(frames)), local)  # torch uint8 frames too
    sketches = sketch(frames)
    single = single_sketch(sketches)
    assert single.shape == sketches.shape
    for t in range(4):
        torch.testing.assert_close(single[:, t], sketches[:, 0])
