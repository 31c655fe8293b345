"""The in-training evaluation callback (``callbacks.evaluation``): the held-out loss is one number for given weights
whatever the world size and however often it is computed; evaluation does not change training; the best checkpoint
follows the monitored number, also across a resume; bad options are named."""

import csv
import math

import pytest
import torch

from helpers import demo_shard_overrides, evaluation_overrides, run_training, write_demo_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_demo_shards(tmp_path_factory.mktemp("shards"))


def test_eval_timesteps():
    from vgen.callbacks.evaluation import eval_timesteps

    assert eval_timesteps(5, 1000) == [100, 300, 500, 700, 900]
    assert eval_timesteps(1, 1000) == [500]
    assert eval_timesteps([0, 999], 1000) == [0, 999]
    with pytest.raises(ValueError, match=r"callbacks.evaluation.timesteps"):
        eval_timesteps([1000], 1000)


def test_held_out_loss_is_the_same_for_any_world_size_and_every_time(shards):
    """Sample j at timestep k always gets the noise of (seed, j, k) (and the tiny KL VAE's posterior noise of
    (seed, j)), so splitting the held-out set over 1, 2 or 3 ranks (padded batches weigh 0) sums to one number."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from conftest import CONF_DIR
    from vgen.callbacks.evaluation import held_out_loss, held_out_samples, rank_batches
    from vgen.data.datamodule import SourceConfig

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=tiny"])  # joint stage, tiny KL autoencoder
    torch.manual_seed(0)
    stage = instantiate(cfg.stage)
    sources = [SourceConfig.parse({"urls": str(shards / "videos-000001.tar"), "type": "video"}, "s0"),
               SourceConfig.parse({"urls": str(shards / "images-000000.tar"), "type": "image"}, "s1")]
    samples = held_out_samples(sources, {"sample_fps": 8}, 4, 16, 16, per_source=5, seed=0)
    assert [(kind, len(s)) for kind, s in samples] == [("video", 5), ("image", 5)]

    def loss(world: int, seed: int = 0) -> torch.Tensor:
        return sum(held_out_loss(stage, rank_batches(samples, rank, world, 2), [100, 700], seed)
                   for rank in range(world))

    one = loss(1)
    assert one[-1] == 10 and torch.isfinite(one).all()
    assert torch.equal(loss(1), one)
    for world in (2, 3):
        torch.testing.assert_close(loss(world), one, rtol=1e-6, atol=0)
    assert not torch.allclose(loss(1, seed=1), one, rtol=1e-3, atol=0)


def _rows(run_dir):
    with open(max((run_dir / "csv").glob("version_*/metrics.csv"))) as f:
        return list(csv.DictReader(f))


def _by_step(rows, key):
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def test_evaluation_keeps_the_best_checkpoint_and_leaves_training_unchanged(shards, tmp_path):
    from vgen.training.checkpointing import resume_problem

    common = ["experiment=demo", "debug=tiny", "logger=csv", "callbacks.progress=null", "trainer.max_steps=3",
              *demo_shard_overrides(shards)]
    # max: the loss falls over these steps, so the best is not simply the newest evaluation
    evaluated = [*evaluation_overrides(shards), "callbacks.evaluation.mode=max"]
    run_training([*common, f"paths.log_dir={tmp_path}", *evaluated], tmp_path / "eval")
    run_training([*common, f"paths.log_dir={tmp_path}"], tmp_path / "plain")
    rows = _rows(tmp_path / "eval")
    assert _by_step(rows, "train/loss") == _by_step(_rows(tmp_path / "plain"), "train/loss")  # bit for bit

    run_training([*common, f"paths.log_dir={tmp_path}", *evaluated, "resume=auto", "trainer.max_steps=4"],
                 tmp_path / "eval")
    losses = {**_by_step(rows, "eval/loss"), **_by_step(_rows(tmp_path / "eval"), "eval/loss")}
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    for metric in ("direction", "shape_found", "color"):
        assert set(_by_step(rows, f"eval/{metric}")) == {1, 2, 3}
    best_step = max(losses, key=losses.get)
    best = tmp_path / "eval" / "checkpoints" / "best.ckpt"
    assert resume_problem(best) is None
    saved = torch.load(best, map_location="cpu", weights_only=True)
    assert saved["global_step"] == best_step, (losses, saved["global_step"])
    last = torch.load(tmp_path / "eval" / "checkpoints" / "step0000004.ckpt", map_location="cpu", weights_only=True)
    assert last["callbacks"]["Evaluation"] == {"best": pytest.approx(losses[best_step], rel=1e-6),
                                               "best_step": best_step}
    videos = sorted(p.relative_to(tmp_path / "eval" / "eval").as_posix()
                    for p in (tmp_path / "eval" / "eval").rglob("*.mp4"))
    assert videos == [f"step_{s:07d}/{i:04d}_seed0.mp4" for s in (1, 2, 3, 4) for i in range(2)]


@pytest.mark.parametrize("options, error", [
    ({}, "nothing to evaluate"),
    ({"prompts": ["a red circle"], "metrics": ["sharpness"]}, "unknown metric 'sharpness'"),
    ({"prompts": ["a red circle"], "metrics": ["fvd"]}, "fvd needs callbacks.evaluation.reference"),
    ({"prompts": ["a red circle"], "metrics": ["direction"]}, r"monitor='eval/loss' is not a number"),
    ({"prompts": ["a red circle"], "monitor": "eval/direction", "metrics": ["direction"], "mode": "best"},
     "mode must be min or max"),
    ({"shards": [{"urls": "/nowhere/held-out-{000000..000001}.tar", "type": "video"}]},
     r"callbacks.evaluation.shards\[0\].urls: 2 of 2 shards are missing"),
    ({"shards": [{"urls": "x.tar"}]}, r"callbacks.evaluation.shards\[0\] needs 'urls' and 'type'"),
    ({"prompts": ["a"], "every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
])
def test_bad_options_are_named(options, error):
    from vgen.callbacks import Evaluation

    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=error):
        Evaluation(enabled=True, **options)
    Evaluation(enabled=False, **options)  # off: nothing is checked, nothing runs
    assert Evaluation().state_dict() == {}


def test_options_that_need_the_model_are_checked_before_the_first_step(shards, tmp_path):
    from vgen.config import ConfigError

    with pytest.raises(ConfigError, match=r"callbacks.evaluation.timesteps must be a count or a list of integers "
                                          r"in \[0, 1000\), got \[5000\]"):
        run_training(["experiment=demo", "debug=tiny", "logger=csv", f"paths.log_dir={tmp_path}",
                      *demo_shard_overrides(shards), *evaluation_overrides(shards), "callbacks.evaluation.timesteps=[5000]"],
                     tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
