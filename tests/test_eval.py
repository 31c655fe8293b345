"""vgen.eval: the Fréchet distance against scipy's sqrtm, I3D / CLIP / RAFT through their real loading code with
tiny random weights in the standard layouts, the toy metrics on rendered clips, `python -m vgen.eval` on a tiny
demo checkpoint and on a folder of mp4 files, the reference-feature cache, and 2 CPU ranks reporting exactly what
1 does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import safetensors.torch
import scipy.linalg
import torch
import torch.nn.functional as F

from conftest import REPO
from helpers import run_training
from vgen.data.synthetic import HELD_OUT, caption, render_clip, sample_motion
from vgen.eval import Extractors, evaluate_videos, frechet_distance, frechet_distance_of_features
from vgen.eval.__main__ import main
from vgen.eval.clip import ClipScorer
from vgen.eval.flow import MotionMagnitude
from vgen.eval.i3d import InceptionI3d, i3d_features, load_i3d
from vgen.eval.run import Prompt
from vgen.eval.toy import color, direction, shape_found
from vgen.media import write_mp4
from vgen.models.text_encoder import TINY_CLIP

ALL_METRICS = "[fvd,clipsim,consistency,motion,direction,shape_found,color]"


# ---------------------------------------------------------------------------------------------- Fréchet distance
def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The usual FID/FVD code: scipy's general matrix square root of Σ₁Σ₂, real part."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm_and_is_a_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 24))
    b = rng.normal(size=(200, 24)) @ rng.normal(size=(24, 24)) * 0.4 + rng.normal(size=24)
    assert frechet_distance_of_features(a, b) == pytest.approx(scipy_frechet(a, b), rel=1e-6, abs=0)
    assert frechet_distance_of_features(b, a) == pytest.approx(frechet_distance_of_features(a, b), rel=1e-9, abs=0)
    assert frechet_distance_of_features(a, a) == pytest.approx(0, abs=1e-9)
    shift = rng.normal(size=24)
    near, far = frechet_distance_of_features(a, a + 0.1 * shift), frechet_distance_of_features(a, a + shift)
    assert 0 < near < far
    assert far == pytest.approx(float(shift @ shift), rel=1e-9)  # same covariance: the squared mean shift
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)


# ---------------------------------------------------------------------------------------------- extractors
def tiny_i3d_state(width: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random I3D weights in the pytorch-i3d layout (no ``num_batches_tracked``, as rgb_imagenet.pt), He-scaled so
    the features depend on the input."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in InceptionI3d(width=width).state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if value.ndim == 5:
            value = torch.randn(value.shape, generator=g) * (2 / value[0].numel()) ** 0.5
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(value.shape, generator=g)
        else:
            value = 0.1 * torch.randn(value.shape, generator=g) + float(key.endswith("bn.weight"))
        state[key] = value
    return state


def random_videos(rng, count: int, frames: int = 4, size: int = 8) -> list[np.ndarray]:
    return [rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8) for _ in range(count)]


def test_i3d_is_the_pytorch_i3d_layout():
    with torch.device("meta"):
        state = InceptionI3d().state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["Conv3d_1a_7x7.conv3d.weight"] == (64, 3, 7, 7, 7)
    assert shapes["Conv3d_2c_3x3.bn.running_var"] == (192,)
    assert shapes["Mixed_4f.b2b.conv3d.weight"] == (128, 32, 3, 3, 3)
    assert shapes["Mixed_5c.b1b.conv3d.weight"] == (384, 192, 3, 3, 3)
    assert shapes["logits.conv3d.weight"] == (400, 1024, 1, 1, 1) and shapes["logits.conv3d.bias"] == (400,)
    assert [k for k in state if k.endswith("conv3d.bias")] == ["logits.conv3d.bias"]  # convolutions before BN: none


def test_i3d_loads_strictly_and_follows_the_fvd_protocol(tmp_path):
    path = tmp_path / "rgb_imagenet.pt"
    torch.save(tiny_i3d_state(), path)
    model = load_i3d(path)
    direct = InceptionI3d(width=8)
    direct.load_state_dict({**direct.state_dict(), **torch.load(path)}, strict=True)
    rng = np.random.default_rng(0)
    long = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    short = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    features = i3d_features(model, [long, long[:16], short, np.repeat(short, 4, axis=0)])
    assert features.shape == (4, 400) and features.dtype == np.float64
    np.testing.assert_array_equal(features[0], features[1])  # the first 16 frames
    np.testing.assert_array_equal(features[2], features[3])  # a shorter clip stretched by repeating frames
    assert np.abs(features[0] - features[2]).max() > 1e-3
    clip = torch.from_numpy(long[:16]).permute(0, 3, 1, 2).float()
    x = (F.interpolate(clip, size=(224, 224), mode="bilinear", align_corners=False) / 127.5 - 1).transpose(0, 1)
    with torch.no_grad():
        np.testing.assert_allclose(features[0], direct(x[None])[0].double().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["missing", "renamed"])
def test_an_i3d_file_that_does_not_match_is_refused_in_one_line(tmp_path, damage):
    state = tiny_i3d_state()
    value = state.pop("Mixed_4b.b1b.conv3d.weight")
    if damage == "renamed":
        state["Mixed_4b.b1b.conv.weight"] = value
    path = tmp_path / "i3d.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_i3d(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "missing (1): Mixed_4b.b1b.conv3d.weight" in message


def tiny_clip_file(path: Path) -> Path:
    torch.manual_seed(0)
    safetensors.torch.save_file(open_clip.CLIP(**TINY_CLIP).state_dict(), path)
    return path


def test_clip_scores_use_one_models_projected_text_and_image_embeddings(tmp_path):
    path = tiny_clip_file(tmp_path / "open_clip.safetensors")
    scorer = ClipScorer("tiny", path)
    model = open_clip.CLIP(**TINY_CLIP)
    model.load_state_dict(safetensors.torch.load_file(path))
    rng = np.random.default_rng(0)
    videos = random_videos(rng, 2, frames=3, size=32)  # the tiny model's input size: no resize
    prompts = ["a red circle moving left", "a blue square"]
    with torch.no_grad():
        text = F.normalize(model.encode_text(open_clip.tokenize(prompts)), dim=-1)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        frames = [F.normalize(model.encode_image((torch.from_numpy(v).permute(0, 3, 1, 2) / 255 - mean) / std), dim=-1)
                  for v in videos]
    expected = [float((f @ t).mean()) for f, t in zip(frames, text)]
    np.testing.assert_allclose(scorer.clipsim(videos, prompts), expected, rtol=1e-5, atol=1e-6)
    adjacent = [float((f[1:] * f[:-1]).sum(-1).mean()) for f in frames]
    np.testing.assert_allclose(scorer.consistency(videos), adjacent, rtol=1e-5, atol=1e-6)
    still = np.repeat(videos[0][:1], 4, axis=0)
    assert scorer.consistency([still])[0] == pytest.approx(1.0, abs=1e-5)
    assert np.isnan(scorer.consistency([still[:1]])[0])

    state = safetensors.torch.load_file(path)
    del state["text_projection"]
    safetensors.torch.save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"bad\.safetensors does not match CLIP: missing \(1\): text_projection$"):
        ClipScorer("tiny", tmp_path / "bad.safetensors")


def test_motion_magnitude_loads_torchvision_raft_strictly(tmp_path):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    state = raft_small().state_dict()
    torch.save(state, tmp_path / "raft_small.pth")
    motion = MotionMagnitude(tmp_path / "raft_small.pth", size=128)
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    scores = motion([video, video[:1]])
    assert np.isfinite(scores[0]) and scores[0] >= 0 and np.isnan(scores[1])
    state.pop("update_block.flow_head.conv2.bias")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth does not match RAFT: missing \(1\): update_block.flow_head"):
        MotionMagnitude(tmp_path / "bad.pth")


def test_toy_metrics_on_rendered_clips():
    rng = np.random.default_rng(0)
    for col, shape, way in HELD_OUT:
        clip = render_clip(col, shape, way, sample_motion(way, 8, 16, rng), 8, 16)
        assert direction(clip, caption(col, shape, way)) == 1.0
        other = next(d for d in ("left", "right", "up", "down") if d != way)
        assert direction(clip, caption(col, shape, other)) == 0.0
        assert color(clip, caption(col, shape, way)) == 1.0
        assert color(clip, caption("green" if col != "green" else "red", shape, way)) == 0.0
        assert shape_found(clip) == 1.0
    blank = np.full((4, 16, 16, 3), 20, np.uint8)
    assert (shape_found(blank), color(blank, "a red circle moving left"), direction(blank, "a red circle moving left")) \
        == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="needs prompts of the demo's form .* got 'a cat'"):
        direction(blank, "a cat")


# ---------------------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny demo checkpoint (2 steps, 8x8 pixels, 4 frames), tiny weight files in the standard layouts, reference
    clips rendered from the held-out prompts (mp4) and prompt files."""
    root = tmp_path_factory.mktemp("eval")
    subprocess.run([sys.executable, str(REPO / "data_pipelines" / "synthetic.py"), "--out", str(root / "data" / "demo"),
                    "--videos", "16", "--images", "8", "--shard-size", "2"], check=True, capture_output=True)
    run_training(["experiment=demo", "debug=tiny", f"paths.data_dir={root / 'data'}", f"paths.log_dir={root}",
                  "model/vae=identity", "model.unet.in_channels=3", "model.unet.out_channels=3",
                  "data.resolution=[8,8]", "data.sources.1.weight=0"], root / "run")
    weights = root / "weights"
    weights.mkdir()
    torch.save(tiny_i3d_state(), weights / "rgb_imagenet.pt")
    tiny_clip_file(weights / "open_clip.safetensors")
    from torchvision.models.optical_flow import raft_small

    torch.save(raft_small().state_dict(), weights / "raft_small.pth")
    reference, rng, prompts = root / "reference", np.random.default_rng(0), []
    reference.mkdir()
    for i, (col, shape, way) in enumerate(HELD_OUT * 2):
        write_mp4(render_clip(col, shape, way, sample_motion(way, 8, 32, rng), 8, 32), reference / f"{i:02d}.mp4")
        prompts.append(caption(col, shape, way))
    (root / "reference.txt").write_text("\n".join(prompts) + "\n")
    (root / "prompts.txt").write_text("\n".join(prompts[:4]) + "\n")
    return {"root": root, "checkpoint": root / "run" / "checkpoints" / "step0000002.ckpt", "weights": weights,
            "reference": reference}


def eval_args(assets, out: Path, metrics: str = ALL_METRICS, *extra: str) -> list[str]:
    w = assets["weights"]
    return [f"checkpoint={assets['checkpoint']}", f"prompts={assets['root'] / 'prompts.txt'}", f"metrics={metrics}",
            f"out={out}", f"reference={assets['reference']}", f"i3d_weights={w / 'rgb_imagenet.pt'}",
            f"clip_weights={w / 'open_clip.safetensors'}", "clip_arch=tiny", f"raft_weights={w / 'raft_small.pth'}",
            "flow_size=128", "seeds=2", "steps=2", "batch_size=2", f"cache_dir={assets['root'] / 'cache'}", *extra]


def test_eval_writes_the_table_of_a_demo_checkpoint(assets, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(eval_args(assets, out)) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["metrics"]) == {"fvd", "clipsim", "consistency", "motion", "direction", "shape_found", "color"}
    assert report["metrics"]["fvd"] > 0 and -1 <= report["metrics"]["clipsim"] <= 1
    assert report["protocols"]["fvd"].startswith("FVD16: I3D Kinetics-400")
    assert [(r["prompt"], r["seed"]) for r in report["videos"]][:4] == [
        (caption(*HELD_OUT[0]), 0), (caption(*HELD_OUT[0]), 2), (caption(*HELD_OUT[1]), 0), (caption(*HELD_OUT[1]), 2)]
    assert all(Path(r["video"]).is_file() for r in report["videos"]) and len(report["videos"]) == 8
    assert (out / "metrics.csv").read_text().splitlines()[0] == "source,videos,fvd,clipsim,consistency,motion," \
                                                                 "direction,shape_found,color"
    assert len((out / "videos.csv").read_text().splitlines()) == 9
    assert "FVD16" in capsys.readouterr().out

    before = (out / "metrics.json").read_bytes()
    assert main(eval_args(assets, out, "[direction]")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.json exists (pass overwrite=true" in err
    assert (out / "metrics.json").read_bytes() == before
    assert main(eval_args(assets, out, "[direction]", "overwrite=true")) == 0
    assert set(json.loads((out / "metrics.json").read_text())["metrics"]) == {"direction"}


def test_eval_scores_a_folder_of_mp4_files(assets, tmp_path):
    """The rendered clips themselves: every toy metric is right, and FVD of the set to itself is 0."""
    w, out = assets["weights"], tmp_path / "folder"
    assert main([f"videos={assets['reference']}", f"prompts={assets['root'] / 'reference.txt'}",
                 "metrics=[fvd,direction,shape_found,color]", f"reference={assets['reference']}",
                 f"i3d_weights={w / 'rgb_imagenet.pt'}", "cache_dir=none", f"out={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics == pytest.approx({"fvd": 0.0, "direction": 1.0, "shape_found": 1.0, "color": 1.0}, abs=1e-6)
    named = [{"prompt": caption(*HELD_OUT[i % 4]), "video": f"{i:02d}.mp4"} for i in (7, 2, 5)]  # any order, a subset
    (tmp_path / "prompts.json").write_text(json.dumps(named))
    assert main([f"videos={assets['reference']}", f"prompts={tmp_path / 'prompts.json'}", "metrics=[direction,color]",
                 f"out={tmp_path / 'named'}"]) == 0
    rows = json.loads((tmp_path / "named" / "metrics.json").read_text())["videos"]
    assert [(Path(r["video"]).name, r["direction"], r["color"]) for r in rows] == [
        ("07.mp4", 1.0, 1.0), ("02.mp4", 1.0, 1.0), ("05.mp4", 1.0, 1.0)]


def test_reference_features_are_cached_per_reference_set(assets, tmp_path):
    import safetensors.numpy

    videos = sorted(assets["reference"].glob("*.mp4"))
    prompts = [Prompt(p, video=v) for p, v in zip((assets["root"] / "prompts.txt").read_text().split("\n"), videos[4:])]
    reference = tmp_path / "reference"
    reference.mkdir()
    for v in videos[:4]:
        (reference / v.name).write_bytes(v.read_bytes())
    cache = tmp_path / "cache"
    extractors = Extractors(i3d_weights=str(assets["weights"] / "rgb_imagenet.pt"))

    def fvd() -> float:
        refs = sorted(reference.glob("*.mp4"))
        return evaluate_videos(prompts, ["fvd"], reference=refs, cache_dir=cache, extractors=extractors).metrics["fvd"]

    first = fvd()
    [cached] = cache.glob("fvd-reference-*.safetensors")
    assert fvd() == first
    features = safetensors.numpy.load_file(cached)["features"]
    safetensors.numpy.save_file({"features": features + 1.0}, cached)
    assert fvd() != pytest.approx(first)  # read from the cache file
    safetensors.numpy.save_file({"features": features}, cached)
    assert fvd() == first
    (reference / videos[0].name).write_bytes(videos[1].read_bytes())  # another reference set: a new cache file
    fvd()
    assert len(list(cache.glob("fvd-reference-*.safetensors"))) == 2


@pytest.mark.parametrize("arguments, needle", [
    (["bogus=1"], "unknown key 'bogus'"),
    (["metrics=[fvd,sharpness]"], "unknown metric 'sharpness'"),
    (["videos=."], "give exactly one of checkpoint= and videos="),
    (["i3d_weights=/nonexistent/rgb_imagenet.pt"], "i3d_weights=/nonexistent/rgb_imagenet.pt: no such file"),
    (["i3d_weights=BAD"], "does not match InceptionI3d: missing (1): logits.conv3d.bias"),
    (["steps=0"], "steps=0: expected an integer"),
    (["prompts=/nonexistent.txt"], "prompts=/nonexistent.txt: no such file"),
    (["checkpoint=/nonexistent.ckpt"], "checkpoint=/nonexistent.ckpt: no such file or directory"),
    (["seeds=1", "prompts=ONE"], "fvd needs at least 2 videos in each set; got 1 to score"),
])
def test_bad_arguments_fail_with_one_line_and_write_nothing(assets, tmp_path, capsys, arguments, needle):
    state = tiny_i3d_state()
    del state["logits.conv3d.bias"]
    torch.save(state, tmp_path / "bad.pt")
    (tmp_path / "one.txt").write_text("a red circle moving left\n")
    arguments = [a.replace("BAD", str(tmp_path / "bad.pt")).replace("ONE", str(tmp_path / "one.txt")) for a in arguments]
    keys = {a.split("=")[0] for a in arguments}
    args = [a for a in eval_args(assets, tmp_path / "out") if a.split("=")[0] not in keys] + arguments
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("vgen.eval: error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_two_cpu_ranks_report_what_one_does(assets, tmp_path):
    metrics = "[fvd,clipsim,consistency,direction,shape_found,color]"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank
    try:
        assert main(eval_args(assets, tmp_path / "one", metrics)) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "vgen.eval", *eval_args(assets, tmp_path / "two", metrics)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    # the features of a video may come from batches of other sizes on 2 ranks: equal up to float summation order
    assert two["metrics"].keys() == one["metrics"].keys()
    assert all(two["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9) for k, v in one["metrics"].items())
    strip = [{k: v for k, v in row.items() if k != "video"} for row in one["videos"]]
    assert [{k: v for k, v in row.items() if k != "video"} for row in two["videos"]] == strip
    assert sorted(p.name for p in (tmp_path / "two" / "videos").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "videos").iterdir())
