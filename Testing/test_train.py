"""Pretraining: config, checkpoints, the epoch loop and the DRoPETrain/train.py script (tiny preset, CPU)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import DRoPE
from DRoPE.training import config as tconfig
from DRoPE.training import data as tdata
from DRoPE.training.engine import StepSchedule, TrainingError, train_one_epoch
from DRoPE.training.report import read_log_csv
from DRoPE.training.state import load_checkpoint, save_checkpoint, TrainingState

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DRoPETrain"))
import train as train_script  # noqa: E402  (DRoPETrain/train.py)

THREADS = ["--threads", "2"]


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory) -> Path:
    """Preprocessing cache shared by the training tests of this session (brain masking is the slow part)."""
    path = tmp_path_factory.getbasetemp() / "drope-train-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def canon(sample_dir) -> Path:
    return sample_dir / "dwi.nii.gz"  # the bundled Canon oblique scan (as shared canon_oblique_all20d)


def run_main(*args) -> int:
    return train_script.main([str(a) for a in args])


# --- config --------------------------------------------------------------------------------------------------


def test_presets_and_round_trip():
    paper = tconfig.load_config("paper")
    assert paper == tconfig.TrainConfig() and paper.model == "paper"
    assert (paper.masking.strategy, paper.masking.lambda_start, paper.masking.lambda_end) == ("alternating", 0.05, 0.95)
    assert (paper.data.slab, paper.data.volumes, paper.optim.grad_clip, paper.seed) == (4, 15, 1.0, 0)
    for name in tconfig.TRAIN_PRESETS:
        cfg = tconfig.load_config(name)
        again = tconfig.config_from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
        tconfig.resolve_model_config(cfg)  # every preset builds a valid model config
    small = tconfig.resolve_model_config(tconfig.load_config("small"))
    assert (small.embed_dim, small.depth, small.decoder_embed_dim, small.decoder_depth) == (192, 4, 192, 2)
    assert small.drope


def test_yaml_file_merges_onto_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nmodel: {depth: 3}\noptim:\n  lr: 1e-3\n  epochs: 7\ndata: {crop: 64}\n")
    cfg = tconfig.load_config(path)
    assert cfg.model == "tiny" and cfg.model_overrides_dict == {"depth": 3}
    assert cfg.optim.lr == 1e-3 and cfg.optim.epochs == 7 and cfg.optim.batch_size == 2  # rest from tiny
    assert cfg.data.crop == (64, 64)
    assert tconfig.resolve_model_config(cfg).depth == 3
    assert cfg.with_epochs(2).optim.warmup_epochs == 1.0
    assert tconfig.TrainConfig().with_epochs(30).optim.warmup_epochs == pytest.approx(4.0)


@pytest.mark.parametrize(
    "text, words",
    [
        ("optim: {lrr: 0.1}", ["unknown key 'optim.lrr'", "did you mean 'optim.lr'"]),
        ("dta: {}", ["unknown key 'dta'", "did you mean 'data'"]),
        ("model: {embed_dimm: 48}", ["unknown key 'model.embed_dimm'", "did you mean 'model.embed_dim'"]),
        ("optim: {lr: fast}", ["'optim.lr' must be a number"]),
        ("data: {slab: 6}", ["data.slab (6) must be a multiple", "4"]),
        ("data: {crop: [30, 32]}", ["data.crop", "multiples"]),
        ("masking: {strategy: spacial}", ["did you mean 'spatial'"]),
        ("optim: {warmup_epochs: 500}", ["warmup_epochs", "longer than optim.epochs"]),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(tconfig.ConfigError) as caught:
        tconfig.resolve_model_config(tconfig.load_config(path))
    message = str(caught.value)
    for word in words:
        assert word in message, message


def test_config_spec_must_exist():
    with pytest.raises(tconfig.ConfigError, match="did you mean 'tiny'"):
        tconfig.load_config("tinny")


# --- checkpoints ---------------------------------------------------------------------------------------------


def _toy_training(steps: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def test_checkpoint_round_trip_is_exact(tmp_path):
    model, optimizer = _toy_training(3)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    state = TrainingState(epoch=3, global_step=9, history=[{"epoch": 1, "loss": 0.5}], config={"a": 1})
    save_checkpoint(tmp_path, model, optimizer, state, version=DRoPE.__version__)
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["drope_version"] == DRoPE.__version__ and meta["epoch"] == 3 and meta["global_step"] == 9
    # no pickle anywhere: the tensor file is safetensors, the rest JSON
    tensors = load_file(str(tmp_path / "checkpoint.safetensors"))
    assert tensors["rng/torch"].dtype == torch.uint8
    assert any(k.startswith("optimizer/0/exp_avg") for k in tensors)

    fresh, fresh_opt = _toy_training(0)
    restored = load_checkpoint(tmp_path, fresh, fresh_opt)
    assert (restored.epoch, restored.global_step, restored.history, restored.config) == (3, 9, [{"epoch": 1, "loss": 0.5}], {"a": 1})
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    saved_state, loaded_state = optimizer.state_dict(), fresh_opt.state_dict()
    for index in saved_state["state"]:
        for key, value in saved_state["state"][index].items():
            assert torch.equal(value, loaded_state["state"][index][key]), (index, key)
    assert loaded_state["param_groups"][0]["betas"][1] == 0.99
    assert random.random() == expected_draws[0] and np.random.rand() == expected_draws[1]
    assert torch.equal(torch.rand(3), expected_draws[2])
    # one more identical step from both gives identical weights
    for m, o in ((model, optimizer), (fresh, fresh_opt)):
        torch.manual_seed(5)
        o.zero_grad()
        m(torch.randn(5, 4)).pow(2).mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_checkpoint_json_from_older_save_is_ignored(tmp_path):
    model, optimizer = _toy_training(1)
    save_checkpoint(tmp_path, model, optimizer, TrainingState(epoch=1, global_step=1))
    older = (tmp_path / "checkpoint.json").read_text()
    save_checkpoint(tmp_path, model, optimizer, TrainingState(epoch=2, global_step=2))
    (tmp_path / "checkpoint.json").write_text(older)  # killed between the two renames
    fresh, fresh_opt = _toy_training(0)
    assert load_checkpoint(tmp_path, fresh, fresh_opt).epoch == 2


# --- the epoch loop ------------------------------------------------------------------------------------------


class _OOMModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_says_what_to_lower():
    batch = {"x": torch.zeros(2, 3, 16, 16, 4), "bvals": torch.zeros(2, 3), "bvecs": torch.zeros(2, 3, 3)}
    model = _OOMModel()
    schedule = StepSchedule(4, 1e-3, 1e-5, 1.0, 0.04, 0.4, 0.05, 0.95)
    with pytest.raises(TrainingError) as caught:
        train_one_epoch(model, [batch], torch.optim.AdamW(model.parameters()), epoch=0, steps_per_epoch=1,
                        schedule=schedule, make_keep=lambda B, V, P, g: torch.ones(B, V, P, dtype=torch.bool),
                        strategy="spatial", patch=(8, 8, 4), device=torch.device("cpu"), seed=0)
    message = str(caught.value)
    for word in ("out of memory", "batch_size", "volumes", "slab", "crop"):
        assert word in message


def test_epoch_sets_schedules_per_step_and_skips_decay_of_norms():
    from DRoPE.model import MASKING, DRoPEMAE, model_config
    from DRoPE.training.runtime import build_optimizer

    torch.manual_seed(0)
    model = DRoPEMAE(model_config("tiny"))
    optimizer = build_optimizer(model, lr=1.0, betas=(0.9, 0.999), eps=1e-8)
    names = {id(p): n for n, p in model.named_parameters()}
    plain = {names[id(p)] for g in optimizer.param_groups if not g["apply_weight_decay"] for p in g["params"]}
    assert all(model.get_parameter(n).ndim <= 1 or n.endswith("token") for n in plain) and plain
    bvals = torch.tensor([[0.0, 1000, 1000, 2000]] * 2)
    bvecs = torch.nn.functional.normalize(torch.randn(2, 4, 3), dim=-1) * (bvals > 0)[..., None]
    batch = {"x": torch.rand(2, 4, 16, 16, 4), "bvals": bvals, "bvecs": bvecs}
    schedule = StepSchedule(4, 1e-3, 1e-5, 1.0, 0.04, 0.4, 0.05, 0.95)
    seen = []

    def on_step(info):
        seen.append((info["lr"], [g["weight_decay"] for g in optimizer.param_groups]))

    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_one_epoch(
        model, [batch, batch, batch], optimizer, epoch=1, steps_per_epoch=3, schedule=schedule,
        make_keep=lambda B, V, P, g: MASKING["diffusion"](B, V, P, generator=g), strategy="diffusion",
        patch=(8, 8, 4), device=torch.device("cpu"), seed=0, amp_dtype=torch.bfloat16, grad_clip=1.0, on_step=on_step,
    )
    for step, (lr, wds) in enumerate(seen):
        t = 1 + (step + 1) / 3
        expected_lr, expected_wd, _ = schedule.at(t)
        assert lr == pytest.approx(expected_lr) and wds == [pytest.approx(expected_wd), 0.0]
    assert metrics["lambda"] == pytest.approx(schedule.at(2.0)[2]) and metrics["steps"] == 3 and metrics["samples"] == 6
    assert all(np.isfinite(metrics[k]) for k in ("loss", "loss_visible", "loss_masked", "grad_norm"))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# --- the script ----------------------------------------------------------------------------------------------


def _model_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint.safetensors"))


def _eval_losses(model, batch, patches: int) -> float:
    from DRoPE.model.masking import MASKING

    model.eval()
    B, V = batch["x"].shape[:2]
    keep = MASKING["spatial"](B, V, patches, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float(model(batch["x"], batch["bvals"], batch["bvecs"], keep, 0.5).loss_visible)


@pytest.mark.slow
def test_loss_goes_down_on_real_data(tmp_path, canon, train_cache):
    """Reconstruction error of held-back slabs (fixed masks) falls well below the untrained model's."""
    from DRoPE.model.mae import DRoPEMAE, model_config

    cfg_path = tmp_path / "loss.yaml"
    cfg_path.write_text(
        "preset: tiny\noptim: {epochs: 6, warmup_epochs: 0.5, lr: 3.0e-3}\n"
        "masking: {strategy: spatial, lambda_start: 0.05, lambda_end: 0.05}\ndata: {samples_per_subject: 8}\n"
    )
    run = tmp_path / "run"
    assert run_main("--data", canon, "--out", run, "--config", cfg_path, "--cache", train_cache, *THREADS) == 0
    cfg = tconfig.load_config(cfg_path)
    done, _ = tdata.prepare_cache(tdata.find_dwis(canon), train_cache, cfg.data, (8, 8, 4))
    dataset = tdata.SlabDataset([done[0]], cfg.data, seed=99)
    batch = tdata.collate_samples([dataset[(10_000, i)] for i in range(8)])  # draws no training epoch made
    torch.manual_seed(123)
    untrained = DRoPEMAE(model_config("tiny"))
    before = _eval_losses(untrained, batch, 16)
    trained = DRoPEMAE(model_config("tiny"))
    trained.load_state_dict({k[len("model/"):]: v for k, v in _model_tensors(run).items() if k.startswith("model/")})
    after = _eval_losses(trained, batch, 16)
    assert after < 0.8 * before, (before, after)
    # outputs of a finished run
    rows = read_log_csv(run / "log.csv")
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert rows[-1]["lr"] == pytest.approx(1e-5, rel=1e-3) and rows[0]["strategy"] == "spatial"
    assert all(0.0 <= r["data_wait_fraction"] < 1.0 and r["samples_per_s"] > 0 for r in rows)
    for name in ("model.safetensors", "model.json", "loss_curve.png", "checkpoint.json", "data.json"):
        assert (run / name).is_file(), name


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, canon, train_cache) -> Path:
    """Tiny preset, 4 epochs without interruption (workers 0)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert run_main("--data", canon, "--out", run, "--config", "tiny", "--cache", train_cache, *THREADS) == 0
    return run


def _assert_same_run(a: Path, b: Path) -> None:
    ta, tb = _model_tensors(a), _model_tensors(b)
    assert set(ta) == set(tb)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key  # weights, optimizer moments and RNG: bitwise
    la, lb = read_log_csv(a / "log.csv"), read_log_csv(b / "log.csv")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert json.loads((a / "checkpoint.json").read_text())["global_step"] == json.loads((b / "checkpoint.json").read_text())["global_step"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_equals_uninterrupted(tmp_path, canon, train_cache, straight_run, workers):
    run = tmp_path / "run"
    common = ["--data", canon, "--out", run, "--config", "tiny", "--cache", train_cache, "--workers", workers, *THREADS]
    assert run_main(*common, "--stop-after-epoch", 2) == 0
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["epoch"] == 2 and not (run / "model.safetensors").exists()
    assert run_main("--data", canon, "--out", run, "--cache", train_cache, "--workers", workers, "--resume", *THREADS) == 0
    assert len(read_log_csv(run / "log.csv")) == 4
    _assert_same_run(straight_run, run)


def test_existing_run_needs_resume_and_same_config(capsys, tmp_path, canon, train_cache, straight_run):
    assert run_main("--data", canon, "--out", straight_run, "--config", "tiny", "--cache", train_cache) == 2
    assert "--resume" in capsys.readouterr().err
    assert run_main("--data", canon, "--out", straight_run, "--config", "paper", "--cache", train_cache, "--resume") == 2
    err = capsys.readouterr().err
    assert "differs from the checkpoint" in err and "model.preset" in err


@pytest.mark.slow
def test_torchrun_two_processes_hold_identical_weights(tmp_path, canon, train_cache):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "DRoPETrain" / "train.py"), "--data", str(canon), "--out", str(run), "--config", "tiny",
        "--cache", str(train_cache), "--threads", "1", "--weights-hash", str(tmp_path / "hash"),
    ]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    hashes = [(tmp_path / f"hash.rank{r}").read_text().strip() for r in range(2)]
    assert len(hashes[0]) == 64 and hashes[0] == hashes[1]
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["global_step"] == 4  # 4 samples per epoch split over 2 processes: 1 step of 2 per epoch
    assert (run / "model.safetensors").is_file() and len(read_log_csv(run / "log.csv")) == 4


# --- errors --------------------------------------------------------------------------------------------------


def _bad_dwi(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dwi.nii.gz").write_bytes(b"\x1f\x8b truncated gzip, not a NIfTI")
    (folder / "dwi.bval").write_text("0 1000 1000\n")
    (folder / "dwi.bvec").write_text("0 1 0\n0 0 1\n0 0 0\n")
    return folder / "dwi.nii.gz"


def _one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    return err[0]


def test_empty_data_folder(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "brain_mask.nii.gz").write_bytes(b"")
    assert run_main("--data", tmp_path / "data", "--out", tmp_path / "run", "--config", "tiny") == 2
    assert "no DWI found" in _one_line_error(capsys)


def test_unreadable_file_and_config_typo(capsys, tmp_path):
    bad = _bad_dwi(tmp_path / "data" / "sub-01")
    assert run_main("--data", tmp_path / "data", "--out", tmp_path / "run", "--config", "tiny", "--cache", tmp_path / "c") == 2
    line = _one_line_error(capsys)
    assert str(bad) in line and "--skip-bad" in line and "1 of 1" in line
    typo = tmp_path / "typo.yaml"
    typo.write_text("preset: tiny\noptim: {batch_sise: 2}\n")
    assert run_main("--data", tmp_path / "data", "--out", tmp_path / "run2", "--config", typo) == 2
    line = _one_line_error(capsys)
    assert "typo.yaml" in line and "'optim.batch_sise'" in line and "'optim.batch_size'" in line


def test_corrupt_dwi_among_good_ones(capsys, tmp_path, canon, train_cache):
    bad = _bad_dwi(tmp_path / "bad")
    listing = tmp_path / "subjects.txt"
    listing.write_text(f"{canon}\nbad/dwi.nii.gz\n")
    common = ["--data", listing, "--config", "tiny", "--epochs", 1, "--cache", train_cache, *THREADS]
    assert run_main(*common, "--out", tmp_path / "run") == 2
    line = _one_line_error(capsys)
    assert "1 of 2 DWIs could not be read" in line and str(bad) in line and str(canon) not in line
    with pytest.warns(UserWarning, match="bad/dwi.nii.gz"):
        assert run_main(*common, "--out", tmp_path / "run2", "--skip-bad") == 0
    record = json.loads((tmp_path / "run2" / "data.json").read_text())
    assert len(record["subjects"]) == 1 and str(bad) in record["skipped"][0]


def test_out_of_memory_exits_2_with_advice(capsys, tmp_path, canon, train_cache, monkeypatch):
    from DRoPE.model.mae import DRoPEMAE

    def oom(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(DRoPEMAE, "forward", oom)
    assert run_main("--data", canon, "--out", tmp_path / "run", "--config", "tiny", "--cache", train_cache) == 2
    line = _one_line_error(capsys)
    assert "out of memory" in line and "batch_size" in line and "crop" in line
