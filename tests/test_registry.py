"""domaingrad.registry: names to algorithms, datasets and hyperparameters, and initial
weights passed explicitly to the algorithm's featurizers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import domaingrad as dg
from domaingrad import models
from domaingrad.errors import DomainGradError
from domaingrad.run import TrainArgs, TrainingRun


def test_public_names_load_on_first_use_only():
    """``import domaingrad`` (and so the CLI's start-up) imports neither torch nor the
    registries; the first use of a public name does."""
    code = (
        "import sys, domaingrad as dg; before = 'torch' in sys.modules; names = dg.list_algorithms(); "
        "print(before, 'torch' in sys.modules, 'ERM' in names, dg.train.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True", "domaingrad.training"]
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        dg.nonexistent  # noqa: B018 - the attribute access is the test


def test_lists_name_every_registered_dataset_and_algorithm():
    assert {"ColoredMNIST", "RotatedMNIST", "PACS", "Debug28"} <= set(dg.list_datasets())
    assert {"ERM", "Fishr", "CorGrad", "RSC", "MetaGSNR"} <= set(dg.list_algorithms())


def test_create_algorithm_fills_missing_hyperparameters_with_the_defaults():
    algorithm = dg.create_algorithm("ERM", (2, 28, 28), 2, 2, {"lr": 1e-2})
    assert isinstance(algorithm, dg.ERM) and algorithm.hparams["lr"] == 1e-2
    assert algorithm.hparams == {**dg.default_hparams("ERM", "ColoredMNIST"), "lr": 1e-2}
    assert algorithm.predict(torch.zeros(3, 2, 28, 28)).shape == (3, 2)
    on_pacs = dg.create_algorithm("ERM", (3, 32, 32), 7, 3, {"resnet18": True}, dataset="PACS")
    assert on_pacs.hparams == {**dg.default_hparams("ERM", "PACS"), "resnet18": True}
    with pytest.raises(DomainGradError, match="unknown hyperparameter 'lrr' for ERM; valid names: .*lr"):
        dg.create_algorithm("ERM", (2, 28, 28), 2, 2, {"lrr": 1.0})
    with pytest.raises(DomainGradError, match="cannot build ERM with these hyperparameters"):
        dg.create_algorithm("ERM", (2, 28, 28), 2, 2, {"lr": -1.0})


def test_get_dataset_builds_a_registered_dataset():
    dataset = dg.get_dataset("Debug28", seed=3)
    assert dataset.environment_names == ["0", "1", "2"] and dataset.input_shape == (3, 28, 28)
    assert torch.equal(dataset[0].x, dg.get_dataset("Debug28", seed=3)[0].x)


def _resnet18_state(path, seed: int) -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(seed)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", ["ERM", "Fish"])
def test_weights_reach_every_featurizer_with_domainbeds_channel_adaptation(tmp_path, name):
    """A torchvision ResNet-18 state dict loaded into two-channel inputs: the first
    convolution takes the file's filters of channels 0 and 1 (DomainBed's cycling over
    the RGB filters), every other tensor is the file's; Fish's inner copy gets them too.
    Loading draws no random numbers: the classifier is the one built without weights."""
    state = _resnet18_state(tmp_path / "r18.pt", seed=5)
    hparams = {"resnet18": True}
    torch.manual_seed(0)
    loaded = dg.create_algorithm(name, (2, 32, 32), 3, 2, hparams, weights=str(tmp_path / "r18.pt"))
    after_loaded = torch.rand(3)
    torch.manual_seed(0)
    random = dg.create_algorithm(name, (2, 32, 32), 3, 2, hparams)
    after_random = torch.rand(3)
    featurizers = [m for m in loaded.modules() if isinstance(m, models.ResNetFeaturizer)]
    assert len(featurizers) == (2 if name == "Fish" else 1)
    for featurizer in featurizers:
        got = featurizer.network.state_dict()
        assert torch.equal(got["conv1.weight"], state["conv1.weight"][:, [0, 1]])
        assert all(torch.equal(got[k], v) for k, v in state.items() if k != "conv1.weight" and not k.startswith("fc."))
    assert not torch.equal(random.featurizer.network.conv1.weight, loaded.featurizer.network.conv1.weight)
    assert torch.equal(random.classifier.weight, loaded.classifier.weight)
    assert torch.equal(after_loaded, after_random)


def test_weights_that_do_not_fit_are_refused_naming_the_entries(tmp_path):
    _resnet18_state(tmp_path / "r18.pt", seed=0)
    with pytest.raises(DomainGradError, match="does not fit ResNet-50"):
        dg.create_algorithm("ERM", (3, 32, 32), 2, 2, weights=str(tmp_path / "r18.pt"))
    with pytest.raises(DomainGradError, match="no ImageNet weights for mnist_cnn"):
        dg.create_algorithm("ERM", (2, 28, 28), 2, 2, weights="imagenet")


def test_a_run_passes_its_initial_weights_explicitly(tmp_path):
    """The training run loads --weights into every featurizer of the algorithm it built."""
    torch.manual_seed(7)
    reference = models.MNIST_CNN((3, 28, 28)).state_dict()
    torch.save(reference, tmp_path / "cnn.pt")
    run = TrainingRun.prepare(
        TrainArgs(
            dataset="Debug28",
            test_envs=[0],
            weights=str(tmp_path / "cnn.pt"),
            hparams={"batch_size": 4},
            output_dir=str(tmp_path / "out"),
        )
    )
    got = run.algorithm.featurizer.state_dict()
    assert all(torch.equal(got[k], v) for k, v in reference.items())


def test_every_domainbed_algorithm_and_dataset_is_registered():
    """domaingrad is a superset of DomainBed (its ALGORITHMS and DATASETS lists at commit
    b93c22a, as report/names.py spells them): a DomainBed table reruns with domaingrad alone."""
    from domaingrad.report.names import DOMAINBED_ALGORITHMS

    missing = [name for name in DOMAINBED_ALGORITHMS if name not in dg.list_algorithms()]
    assert missing == []
    assert len(DOMAINBED_ALGORITHMS) >= 34
    domainbed_datasets = ["Debug28", "Debug224", "ColoredMNIST", "RotatedMNIST", "VLCS", "PACS", "OfficeHome"]
    domainbed_datasets += ["TerraIncognita", "DomainNet", "SVIRO", "WILDSCamelyon", "WILDSFMoW"]
    domainbed_datasets += [f"Spawrious{k}_{lvl}" for k in ("O2O", "M2M") for lvl in ("easy", "medium", "hard")]
    assert [name for name in domainbed_datasets if name not in dg.list_datasets()] == []
