"""``domaingrad download``: archives placed by hand are checked, unpacked and laid out as
DomainBed's ``scripts/download.py`` lays them out; downloads fail at once offline, naming
the URL and where to put the file. No test touches the network: URLs point at a closed
port of this machine, and ``urlopen`` is made to fail wherever a file must be used."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from domaingrad.data import download as dl
from domaingrad.data import get_dataset
from domaingrad.errors import DomainGradError
from tests.conftest import make_image_folder

SMALL = {"image_size": 32, "num_workers": 0}
#: nothing listens on port 9 (discard) here: a connection is refused at once
CLOSED = "http://127.0.0.1:9/"


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test: the files placed by hand must be used."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download {args[0] if args else kwargs}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def zip_tree(archive: Path, root: Path, arcroot: str) -> None:
    """Zip every file under ``root`` as ``arcroot/<relative path>``."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, f"{arcroot}/{path.relative_to(root).as_posix()}")


def tar_tree(archive: Path, root: Path, arcroot: str) -> None:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname=arcroot)


def test_pacs_zip_placed_by_hand_is_unpacked_and_renamed(tmp_path, no_network):
    src = tmp_path / "src"
    domains = ["art_painting", "cartoon", "photo", "sketch"]
    make_image_folder(src, {d: {"dog": 2, "horse": 1} for d in domains}, size=(8, 8))
    data = tmp_path / "data"
    data.mkdir()
    zip_tree(data / "PACS.zip", src, "kfold")  # DomainBed's PACS.zip holds kfold/
    lines: list[str] = []
    assert dl.download("pacs", data, say=lines.append) == data / "PACS"
    assert not (data / "kfold").exists() and not (data / "PACS.zip").exists()  # renamed; archive deleted
    assert any("using" in line and "PACS.zip" in line for line in lines)
    ds = get_dataset("PACS", str(data), **SMALL)
    assert ds.environment_names == domains and [len(e) for e in ds.environments] == [3] * 4
    again: list[str] = []
    dl.download("PACS", data, say=again.append)  # done: nothing fetched (urlopen would fail the test)
    assert any("already there" in line for line in again)


def test_spawrious_tar_gz_and_keep_archives(tmp_path, no_network):
    src = tmp_path / "src"
    layout = {
        f"{s}/{loc}": {b: 1 for b in ("bulldog", "corgi", "dachshund", "labrador")}
        for s in "01"
        for loc in ("beach", "desert", "dirt", "jungle", "mountain", "snow")
    }
    make_image_folder(src, layout, size=(8, 8), suffix=".png")
    data = tmp_path / "data"
    data.mkdir()
    tar_tree(data / "spawrious.tar.gz", src, "spawrious224")
    assert dl.download("SpawriousM2M_easy", data, keep_archives=True, say=lambda _: None) == data / "spawrious224"
    assert (data / "spawrious.tar.gz").is_file()
    ds = get_dataset("SpawriousM2M_easy", str(data), **SMALL)
    assert [len(e) for e in ds.environments] == [8, 4, 4]


def test_terra_incognita_relayout(tmp_path, no_network):
    src = tmp_path / "src"
    images = src / "img" / "eccv_18_all_images_sm"
    make_image_folder(src / "raw", {"x": {"y": 4}}, size=(8, 8))
    images.mkdir(parents=True)
    for k, path in enumerate(sorted((src / "raw" / "x" / "y").iterdir())):
        path.rename(images / f"im{k}.jpg")
    notes = src / "ann" / "eccv_18_annotation_files"
    notes.mkdir(parents=True)
    categories = [{"id": 1, "name": "dog"}, {"id": 2, "name": "car"}, {"id": 3, "name": "empty"}]
    files = {
        "train": {
            "images": [
                {"id": "a", "file_name": "im0.jpg", "location": 38},
                {"id": "b", "file_name": "im1.jpg", "location": 7},
            ],
            "annotations": [{"image_id": "a", "category_id": 1}, {"image_id": "b", "category_id": 1}],
            "categories": categories,
        },
        "cis_val": {
            "images": [
                {"id": "c", "file_name": "im2.jpg", "location": 100},
                {"id": "d", "file_name": "im3.jpg", "location": 46},
            ],
            "annotations": [{"image_id": "c", "category_id": 3}, {"image_id": "d", "category_id": 2}],
            "categories": [],
        },
    }
    for stem in dl.TERRA_ANNOTATIONS:
        (notes / f"{stem}_annotations.json").write_text(json.dumps(files.get(stem, {"images": [], "annotations": []})))
    data = tmp_path / "data"
    (data / "terra_incognita").mkdir(parents=True)
    tar_tree(data / "terra_incognita" / "terra_incognita_images.tar.gz", images, "eccv_18_all_images_sm")
    tar_tree(data / "terra_incognita" / "eccv_18_annotations.tar.gz", notes, "eccv_18_annotation_files")
    dl.download("TerraIncognita", data, say=lambda _: None)
    root = data / "terra_incognita"
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    # location 7 is not one of DomainBed's, "car" not one of its classes; location_46 is made, empty
    assert found == ["location_100/empty/im2.jpg", "location_38/dog/im0.jpg"]
    assert (root / "location_46").is_dir() and not (root / "eccv_18_all_images_sm").exists()


def test_domainnet_duplicates_removed_and_checksum_refused(tmp_path, no_network, monkeypatch):
    data = tmp_path / "data"
    src = tmp_path / "src"
    names = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    for name in names:
        make_image_folder(src / name, {name: {"cat": 2}}, size=(8, 8))
        (data / "domain_net").mkdir(parents=True, exist_ok=True)
        zip_tree(data / "domain_net" / f"{name}.zip", src / name / name, name)
    listing = data / "domain_net" / "domain_net_duplicates.txt"
    listing.write_text("clipart/cat/img1.jpg\nreal/cat/img0.jpg\nsketch/cat/missing.jpg\n")
    with pytest.raises(DomainGradError) as info:  # DomainBed's list has a known SHA-256: this is another file
        dl.download("DomainNet", data, say=lambda _: None)
    assert "sha256" in str(info.value) and "domain_net_duplicates.txt" in str(info.value)
    assert (data / "domain_net" / "clipart.zip").is_file()  # nothing unpacked or deleted
    recipe = dl.RECIPES["DomainNet"]
    mine = hashlib.sha256(listing.read_bytes()).hexdigest()
    sources = recipe.sources[:-1] + (dataclasses.replace(recipe.sources[-1], sha256=mine),)
    monkeypatch.setitem(dl.RECIPES, "DomainNet", dataclasses.replace(recipe, sources=sources))
    dl.download("DomainNet", data, say=lambda _: None)
    ds = get_dataset("DomainNet", str(data), **SMALL)
    assert ds.environment_names == names and [len(e) for e in ds.environments] == [1, 2, 2, 2, 1, 2]
    assert not listing.exists() and not (data / "domain_net" / "real.zip").exists()


def test_mnist_md5_mismatch_is_refused(tmp_path, no_network):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not mnist")
    with pytest.raises(DomainGradError) as info:
        dl.download("ColoredMNIST", tmp_path, say=lambda _: None)
    text = str(info.value)
    assert "md5" in text and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in text and "train-images-idx3-ubyte.gz" in text


def test_offline_download_fails_at_once_naming_url_and_place(tmp_path, monkeypatch):
    recipe = dl.RECIPES["VLCS"]
    url = CLOSED + "VLCS.tar.gz"
    monkeypatch.setitem(
        dl.RECIPES, "VLCS", dataclasses.replace(recipe, sources=(dataclasses.replace(recipe.sources[0], url=url),))
    )
    started = time.monotonic()
    with pytest.raises(DomainGradError) as info:
        dl.download("VLCS", tmp_path, timeout=2, say=lambda _: None)
    assert time.monotonic() - started < 2  # no retry, no wait
    text = str(info.value)
    assert url in text and str(tmp_path / "VLCS.tar.gz") in text and "no retry" in text
    assert list(tmp_path.iterdir()) == []  # no partial file left


def test_bad_archives_are_refused(tmp_path, no_network):
    (tmp_path / "VLCS.tar.gz").write_text("<html>Google Drive can't scan this file for viruses</html>")
    with pytest.raises(DomainGradError, match="not a zip or tar archive"):
        dl.download("VLCS", tmp_path, say=lambda _: None)
    evil = tmp_path / "evil"
    evil.mkdir()
    with zipfile.ZipFile(evil / "PACS.zip", "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(DomainGradError, match="outside"):
        dl.download("PACS", evil, say=lambda _: None)
    assert not (tmp_path / "outside.txt").exists()


def test_unknown_and_fileless_names(tmp_path):
    with pytest.raises(DomainGradError, match="no download known for 'Nope'.*PACS"):
        dl.download("Nope", tmp_path)
    with pytest.raises(DomainGradError, match="nothing to download"):
        dl.download("Debug224", tmp_path)


def test_wilds_download_needs_the_package(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wilds", None)
    monkeypatch.delitem(sys.modules, "wilds.datasets.fmow_dataset", raising=False)
    with pytest.raises(DomainGradError, match="pip install wilds"):
        dl.download("WILDSFMoW", tmp_path)


def test_cli_download(run_cli, tmp_path, monkeypatch, no_network):
    src = tmp_path / "src"
    make_image_folder(src, {"Art": {"a": 1}, "Clipart": {"a": 1}}, size=(8, 8))
    data = tmp_path / "data"
    data.mkdir()
    zip_tree(data / "office_home.zip", src, "OfficeHomeDataset_10072016")
    code, out, err = run_cli("download", "OfficeHome", "--data-dir", data)
    assert code == 0, err
    assert (data / "office_home" / "Art" / "a" / "img0.jpg").is_file() and "done" in out

    def offline(url, timeout=None):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, _, err = run_cli("download", "PACS", "--data-dir", tmp_path / "empty")
    assert code != 0 and "drive.google.com/uc?id=1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd" in err
    assert str(tmp_path / "empty" / "PACS.zip") in err


def test_unpack_keeps_tar_members_inside(tmp_path):
    archive = tmp_path / "x.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DomainGradError, match="cannot unpack"):
        dl.unpack(archive)
    assert not (tmp_path.parent / "escape.txt").exists()
