"""Image-folder datasets on synthetic folders: layouts, class matching, corrupt files,
transforms, splits and the worker-loaded minibatch stream."""

from __future__ import annotations

import json

import pytest
import torch

from domaingrad.data import DATASETS, dataset_class, get_dataset, split_environment
from domaingrad.data.images import IMAGENET_MEAN, IMAGENET_STD
from domaingrad.errors import DomainGradError
from tests.conftest import make_image_folder

SMALL = {"image_size": 32, "num_workers": 0}


@pytest.mark.parametrize(
    "name,directory,domains",
    [
        ("OfficeHome", "office_home", ["Art", "Clipart", "Product", "Real World"]),
        ("TerraIncognita", "terra_incognita", ["location_100", "location_38", "location_43", "location_46"]),
        ("DomainNet", "domain_net", ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]),
    ],
)
def test_domainbed_layouts(tmp_path, name, directory, domains):
    make_image_folder(tmp_path / directory, {d: {"b_cls": 1, "a_cls": 2} for d in reversed(domains)})
    ds = get_dataset(name, str(tmp_path), **SMALL)
    assert ds.environment_names == domains  # DomainBed's order, whatever the order on disk
    assert ds.class_names == ["a_cls", "b_cls"] and ds.num_classes == 2 and ds.input_shape == (3, 32, 32)
    assert all(env.y.tolist() == [0, 0, 1] for env in ds.environments)
    assert ds.report == () and name in DATASETS


def test_digits_dg_pools_train_and_val(tmp_path):
    layout = {
        f"{d}/{split}": {str(c): 1 for c in range(10)}
        for d in ("mnist", "mnist_m", "svhn", "syn")
        for split in ("train", "val")
    }
    make_image_folder(tmp_path / "digits_dg", layout, size=(32, 32), suffix=".png")
    ds = get_dataset("DigitsDG", str(tmp_path), **SMALL)
    assert ds.environment_names == ["mnist", "mnist_m", "svhn", "syn"]
    assert ds.class_names == [str(c) for c in range(10)]
    assert all(len(env) == 20 and torch.bincount(env.y).tolist() == [2] * 10 for env in ds.environments)


def test_user_folder_missing_class_and_ignored_files(tmp_path):
    make_image_folder(tmp_path / "mine", {"d1": {"cat": 2, "dog": 1}, "d2": {"cat": 1, "dog": 1}, "d3": {"cat": 2}})
    (tmp_path / "mine" / "d1" / "cat" / "notes.txt").write_text("not an image")
    ds = get_dataset("folder:mine", str(tmp_path), **SMALL)
    assert ds.environment_names == ["d1", "d2", "d3"] and ds.num_classes == 2
    assert ds.environments[2].y.tolist() == [0, 0]
    assert any("domain d3 has no images of class(es) dog" in line for line in ds.report)
    assert any("ignored 1 file" in line for line in ds.report)
    assert dataset_class("folder:mine").SMALL_IMAGES is False
    absolute = get_dataset(f"folder:{tmp_path / 'mine'}", None, **SMALL)
    assert [len(e) for e in absolute.environments] == [3, 2, 2]


def test_mismatched_class_folders_are_named_and_a_mapping_fixes_them(tmp_path):
    make_image_folder(
        tmp_path / "PACS",
        {"art_painting": {"dog": 1, "horse": 1}, "cartoon": {"hund": 1, "horse": 1}, "photo": {"dog": 1, "pferd": 1}},
    )
    with pytest.raises(DomainGradError) as info:
        get_dataset("PACS", str(tmp_path), **SMALL)
    text = str(info.value)
    assert "found in one domain only: cartoon/hund, photo/pferd" in text and "--class-map" in text
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"cartoon/hund": "dog", "pferd": "horse"}))
    ds = get_dataset("PACS", str(tmp_path), class_map=str(mapping), **SMALL)
    assert ds.class_names == ["dog", "horse"]
    labels = {p.split("/PACS/")[1].rsplit("/", 1)[0]: int(y) for e in ds.environments for p, y in zip(e.paths, e.y)}
    assert labels == {
        "art_painting/dog": 0,
        "art_painting/horse": 1,
        "cartoon/hund": 0,
        "cartoon/horse": 1,
        "photo/dog": 0,
        "photo/pferd": 1,
    }
    assert any("sketch not found" in line for line in ds.report)
    mapping.write_text(json.dumps({"cartoon/hund": "dog", "pferd": "horse", "typo": "x"}))
    with pytest.raises(DomainGradError, match="match no class folder: typo"):
        get_dataset("PACS", str(tmp_path), class_map=str(mapping), **SMALL)
    mapping.write_text("[1]")
    with pytest.raises(DomainGradError, match="expected a JSON object"):
        get_dataset("PACS", str(tmp_path), class_map=str(mapping), **SMALL)


def test_bad_layouts_are_explained(tmp_path):
    with pytest.raises(DomainGradError, match="pass --data-dir D with D/PACS/<domain>/<class>/<image>"):
        get_dataset("PACS", None, **SMALL)
    with pytest.raises(DomainGradError, match="no directory .*VLCS"):
        get_dataset("VLCS", str(tmp_path), **SMALL)
    make_image_folder(tmp_path / "VLCS", {"Caltech101": {"dog": 1}, "caltech": {"dog": 1}})
    with pytest.raises(DomainGradError, match="not VLCS domains: caltech; expected some of Caltech101"):
        get_dataset("VLCS", str(tmp_path), **SMALL)


def _corrupt_folder(tmp_path):
    paths = make_image_folder(tmp_path / "mine", {"d1": {"a": 3}, "d2": {"a": 3}})
    paths[0].write_bytes(b"")  # empty
    paths[1].write_bytes(b"this is not a JPEG at all")
    paths[3].write_bytes(paths[3].read_bytes()[:200])  # truncated JPEG (valid header)
    return paths


def test_corrupt_images_error_policy_lists_paths(tmp_path):
    paths = _corrupt_folder(tmp_path)
    with pytest.raises(DomainGradError) as info:
        get_dataset("folder:mine", str(tmp_path), **SMALL)
    text = str(info.value)
    assert "3 unreadable or corrupt image file(s)" in text and "--corrupt-images skip" in text
    assert all(str(paths[i]) in text for i in (0, 1, 3)) and str(paths[2]) not in text


def test_corrupt_images_skip_policy_counts_and_leaves_them_out(tmp_path):
    paths = _corrupt_folder(tmp_path)
    ds = get_dataset("folder:mine", str(tmp_path), corrupt_images="skip", **SMALL)
    assert [len(e) for e in ds.environments] == [1, 2]
    assert ds.environments[0].paths == [str(paths[2])]
    line = next(line for line in ds.report if "skipped 3" in line)
    assert str(paths[3]) in line
    # an image that breaks after the check is skipped at load time and logged
    paths[4].write_bytes(b"broken later")
    env = ds.environments[1]
    ((x, y),) = list(env.batches(torch.arange(2), 8))
    assert x.shape == (1, 3, 32, 32) and ds.load_failures == [str(paths[4])]


def test_eval_transform_is_domainbeds(tmp_path):
    from PIL import Image

    folder = tmp_path / "mine" / "d1" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (50, 40), (255, 0, 128)).save(folder / "flat.png")
    Image.new("L", (20, 20), 0).save(folder / "grey.png")  # greyscale files become RGB
    ds = get_dataset("folder:mine", str(tmp_path), image_size=16, num_workers=0)
    ((x, y),) = list(ds.environments[0].batches(torch.arange(2), 4))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 0]
    expected = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0].mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(x[1].mean(dim=(1, 2)), -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD), atol=1e-5)


def _stream_dataset(tmp_path):
    make_image_folder(
        tmp_path / "mine", {"d1": {"a": 4, "b": 3}, "d2": {"a": 2, "b": 5}, "d3": {"a": 3, "b": 3}}, size=(24, 20)
    )
    ds = get_dataset("folder:mine", str(tmp_path), image_size=8, num_workers=0)
    splits = [split_environment(env, 0.2, 0, i) for i, env in enumerate(ds.environments)]
    return ds, [in_split for _, in_split in splits[:2]], splits


def test_in_out_split_applies_to_folders(tmp_path):
    ds, _, splits = _stream_dataset(tmp_path)
    for env, (out_split, in_split) in zip(ds.environments, splits):
        assert len(out_split) == int(0.2 * len(env))
        assert sorted(torch.cat([out_split.indices, in_split.indices]).tolist()) == list(range(len(env)))


def test_stream_is_a_function_of_the_step(tmp_path):
    ds, train_splits, _ = _stream_dataset(tmp_path)
    stream = ds.minibatches(train_splits, 4, seed=7, augment=True)
    batches = [next(stream) for _ in range(4)]
    assert [tuple(x.shape) for x, _ in batches[0]] == [(4, 3, 8, 8), (4, 3, 8, 8)]
    assert not torch.equal(batches[0][0][0], batches[1][0][0])
    for d, split in enumerate(train_splits):  # labels come from the split's own environment
        allowed = set(split.y.tolist())
        assert all(set(b[d][1].tolist()) <= allowed for b in batches)
    state = stream.state_dict()
    assert state == {"step": 4}
    resumed = ds.minibatches(train_splits, 4, seed=7, augment=True)
    resumed.load_state_dict({"step": 2})
    ds.num_workers = 2  # workers and prefetching do not change the stream
    with_workers = ds.minibatches(train_splits, 4, seed=7, augment=True)
    try:
        for step in (2, 3):
            got, again = next(resumed), None
            if step == 2:
                again = [next(with_workers) for _ in range(3)][2]
            for (x, y), (ex, ey) in zip(got, batches[step]):
                assert torch.equal(x, ex) and torch.equal(y, ey)
            if again is not None:
                assert all(torch.equal(a[0], e[0]) for a, e in zip(again, batches[2]))
    finally:
        with_workers.close()
    ds.num_workers = 0
    other_seed = next(ds.minibatches(train_splits, 4, seed=8, augment=True))
    assert not torch.equal(other_seed[0][0], batches[0][0][0])


def test_augmentation_only_when_asked(tmp_path):
    ds, train_splits, _ = _stream_dataset(tmp_path)
    plain = next(ds.minibatches(train_splits, 3, seed=1, augment=False))
    keys = ds.minibatches(train_splits, 3, seed=1).keys_of_step(0)
    x0 = torch.stack(
        [
            ds.eval_transform(__import__("PIL.Image").Image.open(ds.environments[0].paths[pos]).convert("RGB"))
            for slot, pos, _ in keys
            if slot == 0
        ]
    )
    assert torch.equal(plain[0][0], x0)
    augmented = next(ds.minibatches(train_splits, 3, seed=1, augment=True))
    assert not torch.equal(augmented[0][0], x0)


def test_many_files_are_checked_in_worker_processes(tmp_path, monkeypatch):
    from domaingrad.data import folders

    paths = _corrupt_folder(tmp_path)
    monkeypatch.setattr(folders, "PARALLEL_CHECK_MIN", 2)
    ds = get_dataset("folder:mine", str(tmp_path), image_size=32, num_workers=2, corrupt_images="skip")
    assert [len(e) for e in ds.environments] == [1, 2] and ds.environments[0].paths == [str(paths[2])]


def _domainbed_augment(image_size: int):
    """DomainBed's ``augment_transform`` (``datasets.MultipleEnvironmentImageFolder``),
    built here from torchvision at ``image_size`` instead of 224."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.7, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.3),
            T.RandomGrayscale(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def test_augmented_split_reads_domainbeds_augmentation_seeded_per_sample(tmp_path):
    from PIL import Image

    from domaingrad.rng import seed_hash

    ds, train_splits, splits = _stream_dataset(tmp_path)
    out_split, in_split = splits[0]
    ((clean, y),) = list(in_split.batches(16))
    augmented = in_split.augmented(11)
    assert augmented.augment_seed == 11 and in_split.augment_seed is None  # the split itself stays clean
    ((x, ya),) = list(augmented.batches(16))
    assert torch.equal(ya, y) and x.shape == clean.shape == (len(in_split), 3, 8, 8)
    assert not torch.equal(x, clean)
    augment = _domainbed_augment(8)
    expected = []
    for pos in in_split.indices.tolist():
        with Image.open(ds.environments[0].paths[pos]) as image, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_hash(11, pos))
            expected.append(augment(image.convert("RGB")))
    assert torch.equal(x, torch.stack(expected))
    # a function of the seed and the sample only: not of the batch size, the workers or the global RNG
    torch.manual_seed(123)
    ds.num_workers = 2
    try:
        again = torch.cat([bx for bx, _ in augmented.batches(2)])
    finally:
        ds.num_workers = 0
    assert torch.equal(again, x)
    ((other, _),) = list(in_split.augmented(12).batches(16))
    assert not torch.equal(other, x)


def test_in_memory_environments_refuse_an_augmentation_seed():
    from domaingrad.data import TensorEnvironment

    env = TensorEnvironment("e", torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    split = split_environment(env, 0.5, 0, 0)[1]
    assert len(list(split.batches(2))) == 1
    with pytest.raises(DomainGradError, match="no augmentation"):
        list(split.augmented(3).batches(2))
