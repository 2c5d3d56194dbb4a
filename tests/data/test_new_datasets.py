"""DomainBed's Debug224, SVIRO, Spawrious and WILDS datasets on tiny folders written in
DomainBed's layout: environments, classes, lengths and labels."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from domaingrad.data import DATASETS, dataset_class, get_dataset
from domaingrad.data.spawrious import SPAWRIOUS_CLASSES, SPAWRIOUS_LOCATIONS, SpawriousO2O_easy
from domaingrad.errors import DomainGradError
from tests.conftest import make_image_folder

SMALL = {"image_size": 32, "num_workers": 0}
SPAWRIOUS = ["SpawriousO2O_easy", "SpawriousO2O_medium", "SpawriousO2O_hard"] + [
    "SpawriousM2M_easy",
    "SpawriousM2M_medium",
    "SpawriousM2M_hard",
]


def test_debug224_is_debug28_at_224_pixels():
    ds = get_dataset("Debug224", seed=3)
    assert ds.environment_names == ["0", "1", "2"] and ds.num_classes == 2
    assert ds.input_shape == (3, 224, 224) and all(e.x.shape == (16, 3, 224, 224) for e in ds.environments)
    assert all(set(e.y.tolist()) <= {0, 1} for e in ds.environments)
    assert dataset_class("Debug224").SMALL_IMAGES is False and dataset_class("Debug28").SMALL_IMAGES is True
    generator = torch.Generator().manual_seed(3)  # per environment: inputs, then labels
    x0, y0 = torch.randn(16, 3, 224, 224, generator=generator), torch.randint(0, 2, (16,), generator=generator)
    assert torch.equal(ds.environments[0].x, x0) and torch.equal(ds.environments[0].y, y0)
    assert torch.equal(get_dataset("Debug224", seed=3).environments[2].x, ds.environments[2].x)


def test_sviro_layout(tmp_path):
    domains = ["aclass", "escape", "hilux", "i3", "lexus", "tesla", "tiguan", "tucson", "x5", "zoe"]
    make_image_folder(tmp_path / "sviro", {d: {"empty": 1, "adult": 2} for d in reversed(domains)}, size=(8, 8))
    ds = get_dataset("SVIRO", str(tmp_path), **SMALL)
    assert ds.environment_names == domains  # DomainBed's (sorted) order
    assert ds.class_names == ["adult", "empty"] and [e.y.tolist() for e in ds.environments] == [[0, 0, 1]] * 10
    assert dataset_class("SVIRO").CHECKPOINT_FREQ == 300


def spawrious_folder(root: Path, per_folder: int = 3) -> Path:
    """``root/spawrious224/<0|1>/<location>/<breed>/img<k>.png``, ``per_folder`` each."""
    layout = {
        f"{subset}/{location}": {breed: per_folder for breed in SPAWRIOUS_CLASSES}
        for subset in ("0", "1")
        for location in SPAWRIOUS_LOCATIONS
    }
    make_image_folder(root / "spawrious224", layout, size=(8, 8), suffix=".png")
    return root


@pytest.fixture(scope="module")
def spawrious_dir(tmp_path_factory) -> Path:
    return spawrious_folder(tmp_path_factory.mktemp("spawrious"))


def folders(env) -> list[str]:
    """``<subset>/<location>/<breed>/<file>`` of every image of an environment."""
    return ["/".join(Path(p).parts[-4:]) for p in env.paths]


LABEL = {"bulldog": 0, "corgi": 1, "dachshund": 2, "labrador": 3}


@pytest.mark.parametrize("name", SPAWRIOUS)
def test_spawrious_environments_and_lengths(spawrious_dir, name):
    ds = get_dataset(name, str(spawrious_dir), **SMALL)
    assert ds.environment_names == ["Test", "SC_group_1", "SC_group_2"] and ds.num_classes == 4
    assert ds.class_names == ["bulldog", "corgi", "dachshund", "labrador"]
    # 3 images per folder, far below the limits: O2O trains on 4 breed + 4 filler folders,
    # M2M on 4 breed folders; both test on 8 folders
    n_train = 24 if "O2O" in name else 12
    assert [len(e) for e in ds.environments] == [24, n_train, n_train]
    for env in ds.environments:
        assert env.y.tolist() == [LABEL[f.split("/")[2]] for f in folders(env)]
        assert torch.bincount(env.y, minlength=4).tolist() == [len(env) // 4] * 4
    assert dataset_class(name).CHECKPOINT_FREQ == 100 and name in DATASETS


def test_spawrious_m2m_hard_folders(spawrious_dir):
    ds = get_dataset("SpawriousM2M_hard", str(spawrious_dir), **SMALL)
    per = lambda env: list(dict.fromkeys(f.rsplit("/", 1)[0] for f in folders(env)))  # noqa: E731
    # group dirt, jungle, snow, beach; test snow, beach, dirt, jungle (DomainBed)
    assert per(ds[1]) == ["0/dirt/bulldog", "0/jungle/dachshund", "0/snow/labrador", "0/beach/corgi"]
    assert per(ds[2]) == ["0/jungle/bulldog", "0/dirt/dachshund", "0/beach/labrador", "0/snow/corgi"]
    assert per(ds[0]) == [
        "0/snow/bulldog",
        "0/beach/dachshund",
        "0/dirt/labrador",
        "0/jungle/corgi",
        "0/beach/bulldog",
        "0/snow/dachshund",
        "0/jungle/labrador",
        "0/dirt/corgi",
    ]


class TinyO2OEasy(SpawriousO2O_easy):
    """SpawriousO2O_easy with DomainBed's total of 3168 images per breed cut to 10: limits
    int(0.97*10)=9 and int(0.87*10)=8 per breed folder, filler 10-9=1 and 10-8=2."""

    TOTAL = 10


def test_spawrious_o2o_limits_and_subsets(spawrious_dir):
    ds = TinyO2OEasy(str(spawrious_dir), **SMALL)
    # group desert, jungle, dirt, snow; test dirt, snow, desert, jungle; filler beach
    breeds = ["0/desert/bulldog", "0/jungle/dachshund", "0/dirt/labrador", "0/snow/corgi"]
    filler = ["0/beach/bulldog", "0/beach/dachshund", "0/beach/labrador", "0/beach/corgi"]
    assert folders(ds[1]) == [f"{b}/img{k}.png" for b in breeds for k in range(3)] + [f"{f}/img0.png" for f in filler]
    second = [f.replace("0/", "1/", 1) for f in breeds]
    filler2 = [f.replace("0/", "1/", 1) for f in filler]
    assert folders(ds[2]) == [f"{b}/img{k}.png" for b in second for k in range(3)] + [
        f"{f}/img{k}.png" for f in filler2 for k in range(2)
    ]
    test = ["dirt/bulldog", "snow/dachshund", "desert/labrador", "jungle/corgi"]
    assert folders(ds[0]) == [f"{s}/{t}/img{k}.png" for s in "01" for t in test for k in range(3)]
    assert ds[1].y.tolist() == [0] * 3 + [2] * 3 + [3] * 3 + [1] * 3 + [0, 2, 3, 1]


def test_spawrious_reads_either_root_and_loads_batches(spawrious_dir):
    inner = get_dataset("SpawriousM2M_easy", str(spawrious_dir / "spawrious224"), **SMALL)
    outer = get_dataset("SpawriousM2M_easy", str(spawrious_dir), **SMALL)
    assert [e.paths for e in inner.environments] == [e.paths for e in outer.environments]
    x, y = next(inner[1].batches(torch.arange(5), 5))
    assert x.shape == (5, 3, 32, 32) and y.tolist() == inner[1].y[:5].tolist()
    xa, _ = next(inner[1].batches(torch.arange(5), 5, augment_seed=1))
    xb, _ = next(inner[1].batches(torch.arange(5), 5, augment_seed=1))
    assert torch.equal(xa, xb)
    kinds = [type(t).__name__ for t in inner.train_transform.transforms]
    assert kinds == ["Resize", "RandomHorizontalFlip", "ColorJitter", "RandomGrayscale", "ToTensor", "Normalize"]


def test_spawrious_missing_folders_are_listed(tmp_path):
    make_image_folder(tmp_path / "spawrious224", {"0/desert": {"bulldog": 1}}, size=(8, 8), suffix=".png")
    with pytest.raises(DomainGradError) as info:
        get_dataset("SpawriousM2M_easy", str(tmp_path), **SMALL)
    assert "0/mountain/dachshund" in str(info.value) and "domaingrad download Spawrious" in str(info.value)
    with pytest.raises(DomainGradError, match="spawrious224"):
        get_dataset("SpawriousO2O_hard", str(tmp_path / "nowhere"), **SMALL)


# --- WILDS --------------------------------------------------------------------------


class FakeCamelyon:
    """The part of wilds' ``Camelyon17Dataset`` DomainBed uses."""

    def __init__(self, root_dir, download=False):
        self.root_dir = root_dir
        self.metadata_fields = ["hospital", "slide", "y"]
        hospital = torch.tensor([3, 0, 3, 1, 0, 3])
        self.y_array = torch.tensor([1, 0, 0, 1, 1, 0])
        self.metadata_array = torch.stack([hospital, torch.arange(6), self.y_array], dim=1)
        self.n_classes = 2

    def get_input(self, idx):
        return np.full((12, 12, 3), 40 * idx, dtype=np.uint8)  # an array, as some wilds datasets give


@pytest.fixture
def fake_wilds(monkeypatch):
    names = ["wilds", "wilds.datasets", "wilds.datasets.camelyon17_dataset"]
    modules = {name: types.ModuleType(name) for name in names}
    modules["wilds.datasets.camelyon17_dataset"].Camelyon17Dataset = FakeCamelyon
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_wilds_environments_from_metadata(fake_wilds, tmp_path):
    ds = get_dataset("WILDSCamelyon", str(tmp_path), **SMALL)
    # one environment per distinct hospital value, sorted, named <field>_<value>
    assert ds.environment_names == ["hospital_0", "hospital_1", "hospital_3"] and ds.num_classes == 2
    assert [len(e) for e in ds.environments] == [2, 1, 3]
    assert [e.y.tolist() for e in ds.environments] == [[0, 1], [1], [1, 0, 0]]
    x, y = next(ds[2].batches(torch.arange(3), 3))
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [1, 0, 0]
    # pixel values 0 (index 0) and 200 (index 5): each image is get_input of its own index
    assert x[2].mean() > x[0].mean()
    kinds = [type(t).__name__ for t in ds.train_transform.transforms]
    assert kinds[:2] == ["Resize", "RandomResizedCrop"]


def test_wilds_missing_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wilds", None)  # import wilds -> ImportError
    monkeypatch.delitem(sys.modules, "wilds.datasets.camelyon17_dataset", raising=False)
    monkeypatch.delitem(sys.modules, "wilds.datasets.fmow_dataset", raising=False)
    for name in ("WILDSCamelyon", "WILDSFMoW"):
        with pytest.raises(DomainGradError, match="pip install wilds"):
            get_dataset(name, str(tmp_path), **SMALL)


def test_wilds_camelyon_through_the_real_package(tmp_path):
    pytest.importorskip("wilds", reason="the optional `wilds` package is not installed (pip install wilds)")
    pytest.importorskip("pandas", reason="wilds needs pandas")
    from PIL import Image

    data = tmp_path / "camelyon17_v1.0"
    rows = ["patient,node,x_coord,y_coord,tumor,slide,center,split"]
    for i, (center, tumor) in enumerate([(0, 1), (2, 0), (0, 0), (4, 1)]):
        patch = data / "patches" / f"patient_00{i}_node_0"
        patch.mkdir(parents=True)
        Image.new("RGB", (96, 96), (i * 50, 0, 0)).save(patch / f"patch_patient_00{i}_node_0_x_1_y_2.png")
        rows.append(f"00{i},0,1,2,{tumor},{i},{center},0")
    (data / "metadata.csv").write_text("\n".join(f"{k},{r}" if k else f",{r}" for k, r in enumerate(rows)) + "\n")
    (data / "RELEASE_v1.0.txt").write_text("")
    ds = get_dataset("WILDSCamelyon", str(tmp_path), **SMALL)
    assert ds.environment_names == ["hospital_0", "hospital_2", "hospital_4"]
    assert [e.y.tolist() for e in ds.environments] == [[1, 0], [0], [1]]


@pytest.mark.slow
def test_cli_train_on_spawrious(run_cli, spawrious_dir, tmp_path, single_thread):
    from domaingrad.run.output import read_records

    out = tmp_path / "run"
    code, _, err = run_cli(
        "train", "--dataset", "spawriousm2m_hard", "--data-dir", spawrious_dir, "--algorithm", "ERM",
        "--test-envs", "0", "--steps", "2", "--checkpoint-freq", "2", "--image-size", "32",
        "--weights", "none", "--num-workers", "0", "--hparams", '{"resnet18": true, "batch_size": 4}',
        "--output-dir", out,
    )  # fmt: skip
    assert code == 0, err
    record = read_records(out / "results.jsonl")[0][-1]
    assert record["args"]["dataset"] == "SpawriousM2M_hard" and record["step"] == 1
    # DomainBed's record keys for the three environments: Test (24 images), SC_group_1/2 (12 each)
    assert {f"env{i}_{part}_acc" for i in range(3) for part in ("in", "out")} <= set(record)
