"""Never lose work: mid-epoch checkpoints, exact resume after SIGKILL, NaN and out-of-memory stops."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from vitlab import VitlabError
from vitlab.data.sampling import SeededBatches
from vitlab.runs.rundir import list_checkpoints, load_state
from vitlab.train import DataConfig, TrainConfig, train


def config(**overrides) -> TrainConfig:
    # Augmentation, stochastic depth and dropout all draw random numbers every step, so an exact
    # resume has to replay each of them.
    values = dict(model="vit_nano_patch4_32", epochs=2, batch_size=16, lr=1e-3, warmup_epochs=0.5, drop_path=0.1,
                  model_args={"depth": 2, "drop_rate": 0.1}, checkpoint_every=1,
                  data=DataConfig(num_train=80, num_val=32, randaugment="rand-m9-mstd0.5"))
    values.update(overrides)
    return TrainConfig.from_dict(dict(**values))


def same_weights(a, b) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return train(config(), out, progress=False)


@pytest.mark.parametrize("killed_after", [2, 5, 7])  # mid-epoch 1, right at the epoch end, mid-epoch 2
def test_resume_mid_epoch_is_bit_identical(tmp_path, uninterrupted, killed_after):
    train(config(), tmp_path / "cut", progress=False, stop_after_step=killed_after)
    state = load_state(tmp_path / "cut")
    assert state["position"] == {"epoch": killed_after // 5, "step": killed_after % 5}  # 5 steps an epoch
    resumed = train(config(), tmp_path / "cut", resume=True, progress=False)
    assert same_weights(uninterrupted.run_dir, tmp_path / "cut")
    # the epoch's running sums were checkpointed too: the metrics of the cut epoch are the same
    assert [m["train_loss"] for m in resumed.metrics] == [m["train_loss"] for m in uninterrupted.metrics]


def test_resume_with_worker_processes_is_bit_identical(tmp_path, uninterrupted):
    cfg = config()
    cfg.data.num_workers = 2  # each sample's augmentation is seeded by the sample, not by the process
    train(cfg, tmp_path / "cut", progress=False, stop_after_step=3)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert same_weights(uninterrupted.run_dir, tmp_path / "cut")


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    train(config(epochs=1, keep_checkpoints=2), tmp_path / "run", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["state-00000005.pt", "state-00000004.pt"]
    assert not list((tmp_path / "run").glob(".*tmp*"))  # no temporary file left behind


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, uninterrupted):
    train(config(), tmp_path / "cut", progress=False, stop_after_step=4)
    list_checkpoints(tmp_path / "cut")[0].write_bytes(b"half a file")  # a disk that lost the last write
    with pytest.warns(UserWarning, match="is damaged; resuming from 'state-00000003.pt'"):
        train(config(), tmp_path / "cut", resume=True, progress=False)
    assert same_weights(uninterrupted.run_dir, tmp_path / "cut")


def test_run_killed_with_sigkill_resumes_exactly(tmp_path, uninterrupted):
    """A real kill at an arbitrary moment (mid-step, mid-write), then `vitlab train --resume RUN`."""
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "vitlab", "train", "--model", "vit_nano_patch4_32", "--epochs", "2",
            "--batch-size", "16", "--lr", "1e-3", "--warmup-epochs", "0.5", "--drop-path", "0.1",
            "--num-train", "80", "--num-val", "32", "--randaugment", "rand-m9-mstd0.5", "--checkpoint-every", "1"]
    # the model options of config() that have no flag go in through a recipe file
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_args: {depth: 2, drop_rate: 0.1}\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args + ["--config", str(recipe), "--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "state-00000002.pt").exists():  # kill somewhere in step 3 of epoch 1 or later
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.csv").exists() or len((run / "metrics.csv").read_text().splitlines()) <= 2
    done = subprocess.run([sys.executable, "-m", "vitlab", "train", "--resume", str(run)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert same_weights(uninterrupted.run_dir, run)


def test_non_finite_weights_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th update blows up
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(VitlabError, match=r"NaN or infinite at step 4; lower --lr .* last good checkpoint is kept"):
        train(config(), tmp_path / "run", progress=False)
    newest = load_state(tmp_path / "run")
    assert newest["position"] == {"epoch": 0, "step": 3}
    assert all(torch.isfinite(t).all() for t in newest["model"].values())
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    train(config(), tmp_path / "run", resume=True, progress=False)  # and the run continues from there


def test_nan_loss_names_the_step(tmp_path, monkeypatch):
    from timm.models.vision_transformer import VisionTransformer

    real_forward = VisionTransformer.forward
    monkeypatch.setattr(VisionTransformer, "forward", lambda self, x: real_forward(self, x) * float("nan"))
    with pytest.raises(VitlabError, match=r"loss became nan at step 0 \(epoch 1\); lower --lr"):
        train(config(), tmp_path / "run", progress=False)


def test_out_of_memory_ends_with_advice(tmp_path, monkeypatch):
    from timm.models.vision_transformer import VisionTransformer

    def allocate(self, x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 68719476736 bytes.")

    monkeypatch.setattr(VisionTransformer, "forward", allocate)
    with pytest.raises(VitlabError, match=r"out of memory at step 0 with 16 images per batch; lower --batch-size "
                                          r"\(e.g. 8\), use --precision bf16"):
        train(config(), tmp_path / "run", progress=False)


def test_other_runtime_errors_are_not_called_out_of_memory(tmp_path, monkeypatch):
    from timm.models.vision_transformer import VisionTransformer

    def broken(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(VisionTransformer, "forward", broken)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        train(config(), tmp_path / "run", progress=False)


def test_seeded_batches_resume_is_the_tail_of_the_epoch():
    full = list(SeededBatches(50, 8, seed=3, epoch=2))
    assert len(full) == 6  # 50 // 8, the incomplete batch dropped
    assert list(SeededBatches(50, 8, seed=3, epoch=2, start_step=4)) == full[4:]
    assert list(SeededBatches(50, 8, seed=3, epoch=3)) != full


def test_batch_size_must_split_over_processes():
    with pytest.raises(VitlabError, match="batch size 10 does not split evenly over 4 processes; use a multiple of 4"):
        SeededBatches(100, 10, seed=0, world_size=4)
