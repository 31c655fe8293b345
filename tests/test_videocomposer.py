"""VideoComposer end to end: experiment=videocomposer_stage2 trains at tiny size on condition maps extracted from the
demo clips, and vgen.sample steers a video with the maps of a reference clip and a style image."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from helpers import run_training
from vgen.media import read_mp4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vc")
    subprocess.run([sys.executable, str(REPO / "data_pipelines" / "synthetic.py"), "--out", str(root / "demo"),
                    "--videos", "16", "--images", "8", "--shard-size", "2"], check=True, capture_output=True)
    trainer = run_training(["experiment=videocomposer_stage2", "debug=tiny", f"paths.data_dir={root}",
                            f"paths.log_dir={root}", "callbacks.sample_videos=null", "data.sources.1.weight=0"],
                           root / "run")
    return root, trainer


def test_the_experiment_trains_on_extracted_maps_with_all_none_each_dropout(trained):
    _, trainer = trained
    stage = trainer.lightning_module
    assert trainer.global_step == 2 and stage.conditioning.scheme == "all_none_each"
    spatial = [n for n, c in stage.unet.conditions.items() if c.summed]
    assert spatial == ["depth", "local_image", "motion", "sketch", "single_sketch", "mask"]
    assert stage.unet.conditions["text"].drop_to == "drop"  # TF-T2V zeroes the text under the same dropout


def test_sample_with_the_maps_of_a_reference_clip_and_a_style_image(trained, tmp_path):
    from PIL import Image

    from vgen.pipeline import VideoPipeline
    from vgen.sample import main

    root, _ = trained
    ckpt = root / "run" / "checkpoints" / "step0000002.ckpt"
    reference = next((root / "demo").glob("videos-*.tar"))
    import tarfile

    with tarfile.open(reference) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".mp4"))
        (tmp_path / "ref.mp4").write_bytes(tar.extractfile(member).read())
    Image.new("RGB", (16, 16), (30, 200, 30)).save(tmp_path / "style.png")
    out = tmp_path / "v.mp4"
    args = [f"checkpoint={ckpt}", "prompt=a red circle moving left", "steps=2", f"out={out}",
            f"condition_video={tmp_path / 'ref.mp4'}", "conditions=[sketch,motion]", f"image={tmp_path / 'style.png'}"]
    assert main(args) == 0
    frames, _ = read_mp4(out)
    assert frames.shape[0] == 4
    assert main([*args[:3], f"out={tmp_path / 'x.mp4'}", f"condition_video={tmp_path / 'ref.mp4'}",
                 "conditions=[normals]"]) == 2
    assert main([*args[:3], f"out={tmp_path / 'y.mp4'}", "conditions=[sketch]"]) == 2  # no reference clip

    pipe = VideoPipeline.from_checkpoint(ckpt)
    with torch.no_grad():
        for p in pipe.unet.parameters():  # no zero-initialised output: the conditions' effect is visible
            p.add_(0.05 * torch.randn_like(p))
    maps = pipe.reference_conditions(tmp_path / "ref.mp4", ["sketch", "motion"])
    assert maps["sketch"].shape == (1, 1, 4, 16, 16) and maps["motion"].shape == (1, 2, 4, 16, 16)
    assert set(pipe.reference_conditions(np.zeros((4, 16, 16, 3), np.uint8))) == {
        "local_image", "motion", "sketch", "single_sketch", "mask"}  # the run's maps
    plain = pipe("a red circle moving left", steps=2, seed=0)
    steered = pipe("a red circle moving left", steps=2, seed=0, conditions=maps)
    assert not torch.allclose(plain, steered)
