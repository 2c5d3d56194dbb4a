"""run_provenance: versions, git revision, threads, device, host (issue 6, item 6)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import domaingrad
from domaingrad.run.provenance import git_revision, run_provenance


def test_provenance_reports_this_process(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    info = run_provenance(torch.device("cpu"))
    versions = dict(info["versions"])
    assert torchvision.__version__.startswith(versions.pop("torchvision"))  # metadata omits a +cuXXX suffix
    assert versions == {
        "domaingrad": domaingrad.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    assert info["torch_threads"] == 3
    assert info["device"] == "cpu" and info["device_name"] is None
    assert info["hostname"] and info["platform"] == platform.platform()
    assert run_provenance("cpu")["device"] == "cpu"


def test_git_revision_of_a_checkout_and_of_a_plain_directory(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    try:
        subprocess.run([*git, "init", "-q", str(tmp_path / "repo")], check=True)
        subprocess.run([*git, "-C", str(tmp_path / "repo"), "add", "."], check=True)
        subprocess.run([*git, "-C", str(tmp_path / "repo"), "commit", "-q", "-m", "c"], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not usable here")
    head = subprocess.run(
        ["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert git_revision(package) == (head, False)
    (package / "__init__.py").write_text("x = 2\n")
    git_revision.cache_clear()
    assert git_revision(package) == (head, True)
    untracked = tmp_path / "repo" / "copy"  # an installed copy inside a repository: not its revision
    untracked.mkdir()
    (untracked / "__init__.py").write_text("")
    assert git_revision(untracked) == (None, None)
    assert git_revision(tmp_path / "nowhere") == (None, None)
    assert git_revision(Path("/")) == (None, None)
