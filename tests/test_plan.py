"""``python -m vgen.plan``: ZeRO arithmetic for the full-size UNet, the activation extrapolation against a direct
measurement at another width and clip size, and the report for a 16-node run."""

import pytest

from vgen.plan import (
    STRATEGY_NAMES,
    activation_estimate,
    main,
    model_state_bytes,
    probe_unet,
    saved_activation_bytes,
)

T2V_PARAMS = 1_411_233_860


def test_zero_arithmetic_per_gpu_for_the_full_t2v_unet():
    p, w = T2V_PARAMS, 128
    ddp = model_state_bytes("ddp", p, w, "bf16-mixed", ema=False)
    assert ddp.total == 16 * p and round(ddp.total / 1e9, 1) == 22.6  # the "~23 GB under plain DDP"
    zero2 = model_state_bytes("deepspeed_zero2", p, w, "bf16-mixed", ema=True)
    assert (zero2.params, zero2.grads, zero2.optimizer, zero2.ema) == (2 * p, 2 * p / w, 12 * p / w, 4 * p)
    zero3 = model_state_bytes("deepspeed_zero3", p, w, "bf16-mixed", ema=True)
    assert zero3.total == pytest.approx(20 * p / w)
    fsdp2 = model_state_bytes("fsdp2", p, w, "32-true", ema=True)
    assert fsdp2.total == pytest.approx(20 * p / w)
    offload = model_state_bytes("deepspeed_zero3_offload", p, w, "bf16-mixed", ema=True)
    assert offload.params == offload.optimizer == 0 and offload.host == pytest.approx(14 * p / w)
    with pytest.raises(ValueError, match="unknown strategy 'zero4'"):
        model_state_bytes("zero4", p, w)


def test_activation_extrapolation_matches_a_direct_measurement():
    from omegaconf import OmegaConf

    from conftest import CONF_DIR

    t2v = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "unet" / "t2v.yaml"))
    target = probe_unet(t2v, 96)  # 3x the probe's width, other heads, a clip size the probe never ran
    est = activation_estimate({**t2v, "model_channels": 96, "head_dim": target.config.head_dim}, probe_channels=32,
                              probe_shape=(2, 16, 16))
    for checkpointing in (False, True):
        measured = saved_activation_bytes(target, 3, 24, 40, checkpointing)
        predicted = est.bytes(3, 24, 40, checkpointing)
        assert predicted == pytest.approx(measured, rel=0.1), (checkpointing, predicted, measured)
    assert est.bytes(16, 32, 56, True) < 0.2 * est.bytes(16, 32, 56, False), "checkpointing must cut activations"


def test_plan_report_for_sixteen_nodes(capsys):
    assert main(["experiment=t2v_stage2", "trainer.num_nodes=16", "trainer.devices=8"]) == 0
    out = capsys.readouterr().out
    assert f"UNet: {T2V_PARAMS:,} trainable parameters; world size 128; precision bf16-mixed" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in ([n] for n in
                                                                                          STRATEGY_NAMES)}
    assert set(rows) == set(STRATEGY_NAMES)
    batch = {name: int(cols[7]) for name, cols in rows.items()}
    assert batch["deepspeed_zero3"] >= batch["deepspeed_zero2"] > batch["ddp"] >= 1
    assert float(rows["ddp"][5]) == pytest.approx(16 * T2V_PARAMS / 2**30, rel=1e-3)  # GiB: no EMA in stage 2


def test_a_bad_override_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["model/unet=nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model/unet" in err[0]
