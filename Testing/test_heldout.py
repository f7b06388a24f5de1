"""Held-out evaluation: a short training run of the copy-head model lowers the error on a scan of another session."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from DRoPE.gradients import DWIWarning
from DRoPE.io import load_dwi
from DRoPE.model import DRoPEMAE, model_config, save_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "Testing" / "Data"
sys.path.insert(0, str(REPO / "DRoPETrain"))
import heldout  # noqa: E402
import train  # noqa: E402

CONFIG = """\
preset: tiny
model: {preset: tiny, head: copy}
optim: {epochs: 30, batch_size: 2, lr: 1.0e-3, min_lr: 1.0e-4, warmup_epochs: 1}
masking: {strategy: spatial, lambda_start: 0.9, lambda_end: 0.9}
data: {slab: 4, volumes: 12, crop: [32, 32], samples_per_subject: 6}
"""


def quiet_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        return load_dwi(path)


@pytest.mark.slow
def test_short_training_lowers_the_held_out_error_below_the_shell_mean(tmp_path):
    torch.set_num_threads(1)
    (tmp_path / "train.txt").write_text(
        "\n".join(str(DATA / name / "dwi.nii.gz") for name in ("siemens_xa30_b2500", "philips_achieva_32dir")) + "\n")
    (tmp_path / "config.yaml").write_text(CONFIG)
    assert train.main(["--data", str(tmp_path / "train.txt"), "--out", str(tmp_path / "run"), "--config",
                       str(tmp_path / "config.yaml"), "--threads", "1", "--no-progress"]) == 0
    torch.manual_seed(0)
    save_model(DRoPEMAE(model_config("tiny", head="copy")), tmp_path / "untrained", extra={"slab": 4})
    held_out = quiet_load(DATA / "canon_ortho_same_session" / "dwi.nii.gz")  # another scanner and session
    row = heldout.evaluate_scan(held_out, {"untrained": tmp_path / "untrained", "trained": tmp_path / "run"}, 0.75, 0)
    mse = row["mse"]
    assert mse["untrained"] == pytest.approx(mse["shell mean"], rel=0.02)  # the copy head starts as the shell mean
    assert mse["trained"] < 0.97 * mse["untrained"], mse
    assert np.isfinite(list(row["fa"].values())).all()
