"""Mixed precision and memory format (domaingrad.precision, Algorithm.backward_step)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from domaingrad import precision
from domaingrad.algorithms import ERM, IRM, Algorithm, PCGrad
from domaingrad.errors import DomainGradError
from domaingrad.registry import create_algorithm
from domaingrad.run import TrainArgs
from domaingrad.run.evaluation import auto_eval_batch_size
from domaingrad.run.output import read_records
from domaingrad.run.train import TrainingRun, run_training


def batches(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 2, 28, 28, generator=g), torch.randint(0, 2, (n,), generator=g)) for _ in range(2)]


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="off, bf16, fp16"):
        precision.check_amp("fp8")
    with pytest.raises(ValueError, match="auto, on, off"):
        precision.use_channels_last("yes", "cpu", (3, 32, 32))
    with pytest.raises(ValueError, match=r"image inputs \(C, H, W\)"):
        precision.use_channels_last("on", "cpu", (10,))


def test_autocast_runs_matmuls_in_the_chosen_dtype_and_off_changes_nothing():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with precision.autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with precision.autocast("cpu", "fp16"):
        assert (a @ b).dtype == torch.float16
    with precision.autocast("cpu", "off"):
        assert (a @ b).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")


def test_channels_last_auto_is_cuda_only_and_converts_only_image_batches():
    assert precision.use_channels_last("auto", "cpu", (3, 32, 32)) is False
    assert precision.use_channels_last("auto", "cuda", (3, 32, 32)) is True
    assert precision.use_channels_last("auto", "cuda", (10,)) is False
    assert precision.use_channels_last("on", "cpu", (3, 32, 32)) is True
    x = torch.randn(2, 3, 5, 5)
    y = precision.to_memory_format(x, True)
    assert y.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, y)
    flat = torch.randn(2, 10)
    assert precision.to_memory_format(flat, True) is flat


def test_fp16_readiness_is_read_from_the_class_defining_update():
    assert ERM.fp16_ready()
    assert not PCGrad.fp16_ready()  # per-domain gradients, no loss scaling
    assert not IRM.fp16_ready()  # an ERM subclass with its own update

    class Inherits(ERM):  # inherits ERM.update, so ERM's declaration holds
        pass

    class Overrides(ERM):
        def update(self, minibatches, unlabeled=None):
            return super().update(minibatches)

    assert Inherits.fp16_ready() and not Overrides.fp16_ready()
    assert not Algorithm.fp16_ready()


def test_fp16_loss_scaling_gives_the_unscaled_step_and_skips_an_overflow():
    torch.manual_seed(0)
    plain = create_algorithm("ERM", (2, 28, 28), 2, 2)
    scaled = create_algorithm("ERM", (2, 28, 28), 2, 2)
    scaled.load_state_dict(plain.state_dict())
    scaled.grad_scaler = precision.grad_scaler("cpu", "fp16")
    assert scaled.grad_scaler is not None and precision.grad_scaler("cpu", "bf16") is None
    data = batches()
    plain.update(data)
    scaled.update(data)  # float32 forward, loss scaled by 2**16 then unscaled: the same step
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)
    # an inf loss: the scaler skips the step and halves its scale
    before = [p.detach().clone() for p in scaled.parameters()]
    scale = scaled.grad_scaler.get_scale()
    scaled.optimizer.zero_grad()
    x, y = data[0]
    scaled.backward_step(F.cross_entropy(scaled.predict(x), y) * float("inf"), scaled.optimizer)
    assert scaled.grad_scaler.get_scale() == scale / 2
    assert all(torch.equal(p, b) for p, b in zip(scaled.parameters(), before, strict=True))


def test_the_loss_scaler_is_saved_and_restored_with_the_training_state():
    torch.manual_seed(0)
    algorithm = create_algorithm("ERM", (2, 28, 28), 2, 2)
    algorithm.grad_scaler = precision.grad_scaler("cpu", "fp16")
    algorithm.update(batches())  # the scaler's state exists once it has scaled a loss
    algorithm.grad_scaler.update(1024.0)
    state = algorithm.training_state()
    restored = create_algorithm("ERM", (2, 28, 28), 2, 2)
    restored.grad_scaler = precision.grad_scaler("cpu", "fp16")
    restored.load_training_state(state)
    assert restored.grad_scaler.get_scale() == 1024.0


def test_bf16_update_trains_every_parameter_in_float32():
    torch.manual_seed(0)
    algorithm = create_algorithm("PCGrad", (2, 28, 28), 2, 2)
    before = [p.detach().clone() for p in algorithm.parameters()]
    with precision.autocast("cpu", "bf16"):
        stats = algorithm.update(batches())
    assert all(p.dtype == torch.float32 for p in algorithm.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(algorithm.parameters(), before, strict=True))
    assert torch.isfinite(torch.tensor(stats["loss"]))


# -- the training run's flags ------------------------------------------------------------


def debug_args(tmp_path, **kw):
    kw.setdefault("output_dir", str(tmp_path / "run"))
    return TrainArgs(dataset="Debug28", test_envs=[0], **kw)


def test_eval_batch_size_auto_is_64_on_cpu_and_an_explicit_value_wins(tmp_path):
    assert TrainingRun.prepare(debug_args(tmp_path)).eval_batch_size == 64
    assert TrainingRun.prepare(debug_args(tmp_path, eval_batch_size=32)).eval_batch_size == 32


def test_an_algorithm_can_fix_its_evaluation_batch_size(tmp_path):
    class BatchContext(ERM):
        eval_batch_size = 50

    algorithm = BatchContext((2, 28, 28), 2, 2, create_algorithm("ERM", (2, 28, 28), 2, 2).hparams)
    assert auto_eval_batch_size(algorithm, "cpu") == 50
    assert auto_eval_batch_size(create_algorithm("ERM", (2, 28, 28), 2, 2), "cuda") == 512


def test_fp16_is_refused_for_an_algorithm_without_loss_scaling(tmp_path):
    with pytest.raises(DomainGradError, match=r"--amp fp16 needs loss scaling.*ERM.*--amp bf16"):
        run_training(debug_args(tmp_path, algorithm="PCGrad", amp="fp16"))
    with pytest.raises(DomainGradError, match="--amp must be one of off, bf16, fp16"):
        run_training(debug_args(tmp_path, amp="half"))
    with pytest.raises(DomainGradError, match="--channels-last must be one of auto, on, off"):
        run_training(debug_args(tmp_path, channels_last="nhwc"))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_bf16_and_fp16_runs_train_and_record_their_precision(tmp_path):
    for amp in ("bf16", "fp16"):
        # batches of 4: float16 convolutions are slow on a CPU without float16 units
        args = debug_args(tmp_path, amp=amp, steps=2, checkpoint_freq=1, hparams={"batch_size": 4})
        args.output_dir = str(tmp_path / amp)
        outcome = run_training(args)
        records = read_records(tmp_path / amp / "results.jsonl")[0]
        assert [r["step"] for r in records] == [0, 1]
        assert all(r["args"]["amp"] == amp for r in records)
        assert all(0.0 <= r["env1_in_acc"] <= 1.0 for r in records)
        assert (outcome.run.algorithm.grad_scaler is not None) == (amp == "fp16")


def test_channels_last_on_converts_the_convolution_weights_and_the_batches(tmp_path):
    run = TrainingRun.prepare(debug_args(tmp_path, channels_last="on"))
    conv = next(p for p in run.algorithm.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert run.channels_last
    x = run._to_device(torch.randn(3, 2, 28, 28))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert not TrainingRun.prepare(debug_args(tmp_path)).channels_last  # auto on CPU: off


def test_deterministic_settings_hold_inside_and_are_restored_after():
    before = torch.are_deterministic_algorithms_enabled()
    benchmark_before = torch.backends.cudnn.benchmark
    with precision.backend_settings("cpu", deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() == before
    assert torch.backends.cudnn.benchmark == benchmark_before
    torch.backends.cudnn.benchmark = False
    try:
        with precision.backend_settings("cuda", deterministic=False):
            assert torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = benchmark_before
