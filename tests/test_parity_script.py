"""scripts/parity_domainbed.py: its clear errors without DomainBed, and (when DOMAINBED_DIR
names a DomainBed checkout) five float64 updates of every algorithm equal to DomainBed's."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "parity_domainbed.py"


def run_script(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def load_script():
    spec = importlib.util.spec_from_file_location("parity_domainbed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["parity_domainbed"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def domainbed_algorithm_names(root: str) -> set[str]:
    """The names in ``ALGORITHMS = [...]`` of the checkout's domainbed/algorithms.py (read, not imported)."""
    tree = ast.parse((Path(root) / "domainbed" / "algorithms.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["ALGORITHMS"]:
            return set(ast.literal_eval(node.value))
    raise AssertionError(f"no ALGORITHMS list in {root}/domainbed/algorithms.py")


def test_a_path_that_is_not_a_domainbed_checkout_is_a_clear_error(tmp_path):
    proc = run_script("--domainbed", tmp_path / "nowhere")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "parity_domainbed: error: --domainbed" in proc.stderr
    assert "no domainbed/algorithms.py under" in proc.stderr and "root folder of a DomainBed checkout" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_checkout_that_fails_to_import_is_a_clear_error(tmp_path, capsys, monkeypatch):
    package = tmp_path / "domainbed"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "algorithms.py").write_text("raise ImportError('needs something missing')\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends the checkout
    for name in [m for m in sys.modules if m == "domainbed" or m.startswith("domainbed.")]:
        monkeypatch.delitem(sys.modules, name)
    assert load_script().main(["--domainbed", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "importing domainbed failed: ImportError: needs something missing" in err
    for name in [m for m in sys.modules if m == "domainbed" or m.startswith("domainbed.")]:
        del sys.modules[name]


def test_an_algorithm_without_adapter_is_refused_before_importing(tmp_path, capsys):
    assert load_script().main(["--domainbed", str(tmp_path), "--algorithms", "ERM", "NoSuchAlgorithm"]) == 2
    err = capsys.readouterr().err
    assert "no adapter for NoSuchAlgorithm" in err and "ADAPTERS" in err


def test_every_registered_algorithm_has_an_adapter_or_is_listed_as_not_in_domainbed():
    from domaingrad.algorithms import ALGORITHMS

    script = load_script()
    compared = {a.name for a in script.ADAPTERS.values()}
    assert compared | set(script.NOT_IN_DOMAINBED) == set(ALGORITHMS)
    assert not compared & set(script.NOT_IN_DOMAINBED)
    for new in ("CDANN", "CausIRL_CORAL", "IGA", "IB_IRM", "EQRM", "SelfReg", "CondCAD", "RDM", "ADRMX", "URM"):
        assert new in compared, new
    for new in ("ERMPlusPlus", "MTL", "SagNet", "ARM", "TRM", "Transfer"):
        assert new in compared, new
    assert {"MixStyle", "DMG", "PCGrad", "CorGrad"} <= set(script.NOT_IN_DOMAINBED)
    for key, adapter in script.ADAPTERS.items():  # a variant's row is NAME[variant]
        assert key == (f"{adapter.name}[{adapter.variant}]" if adapter.variant else adapter.name)
    assert {"CAD[unflipped]", "URM[relu]", "Transfer[gda]"} <= set(script.ADAPTERS)


def test_the_adapters_map_layouts_fix_randomness_and_patch_cuda():
    import numpy as np
    import torch

    script = load_script()
    urm = script.ADAPTERS["URM"].names
    assert urm("network.2.weight") == "network.1.weight"  # Sequential(featurizer, activation, classifier)
    assert (
        urm("network.0.conv1.weight") == "network.0.conv1.weight"
        and urm("discriminator.0.bias") == "discriminator.0.bias"
    )
    trm = script.ADAPTERS["TRM"].names
    assert trm("clist.0.weight") is None and trm("classifier.weight") == "classifier.weight"
    assert script.ADAPTERS["URM"].rng == script.ADAPTERS["ADRMX"].rng == "generator"
    assert script.ADAPTERS["ADRMX"].ours == {"adrmx_remix_pairs": "domainbed"}

    class Ours(torch.nn.Module):
        pass

    ours, theirs = Ours(), Ours()
    script.ADAPTERS["CausIRL_MMD"].setup(ours, theirs)
    np.random.seed(3)
    cuts = [ours.draw_cut(n) for n in (5, 7, 9)]
    np.random.seed(3)
    assert cuts == [int(np.random.randint(0, n)) for n in (5, 7, 9)]  # DomainBed's draws
    script.ADAPTERS["ERMPlusPlus"].setup(ours, theirs)
    assert ours.sma_start_iter == theirs.sma_start_iter == 3

    ours.clist = torch.nn.ModuleList(torch.nn.Linear(3, 2) for _ in range(3))
    theirs.clist = [torch.nn.Linear(3, 2) for _ in range(3)]  # DomainBed: a plain list
    script.ADAPTERS["TRM"].setup(ours, theirs)
    for mine, head in zip(ours.clist, theirs.clist):
        assert torch.equal(mine.weight, head.weight) and torch.equal(mine.bias, head.bias)
    theirs.clist.pop()
    with pytest.raises(script.ParityError, match="3 per-domain heads here, 2 in DomainBed"):
        script.ADAPTERS["TRM"].setup(ours, theirs)

    real = torch.Tensor.cuda, torch.nn.Module.cuda
    with script.cuda_is_a_no_op(None) as note:
        t, m = torch.zeros(2), torch.nn.Linear(2, 2)
        assert t.cuda() is t and m.cuda() is m and ".cuda()" in note
    assert (torch.Tensor.cuda, torch.nn.Module.cuda) == real

    with pytest.raises(ValueError, match="rng must be 'seed', 'generator' or 'replay'"):
        script.Adapter("ERM", "ERM", rng="global")


def test_the_adapters_map_fish_onto_wholefish():
    script = load_script()
    assert {"ERM", "IRM", "VREx", "CORAL", "MMD", "DANN", "GroupDRO", "Mixup", "MLDG", "Fish", "SD"} <= set(
        script.ADAPTERS
    )
    fish = script.ADAPTERS["Fish"].names
    assert fish("featurizer.conv1.weight") == "network.net.0.conv1.weight"
    assert fish("classifier.bias") == "network.net.1.bias"
    assert fish("network.1.weight") == "network.net.1.weight"
    assert fish("network_inner.0.conv1.weight") is None


@pytest.mark.skipif(
    not os.environ.get("DOMAINBED_DIR"),
    reason="set DOMAINBED_DIR to the root of a DomainBed checkout to compare every algorithm with DomainBed's",
)
def test_every_algorithm_matches_domainbed_after_five_float64_updates():
    script = load_script()
    # every algorithm of the checkout's DomainBed has an adapter (and so a row)
    assert domainbed_algorithm_names(os.environ["DOMAINBED_DIR"]) == {a.domainbed for a in script.ADAPTERS.values()}
    proc = run_script("--domainbed", os.environ["DOMAINBED_DIR"], timeout=3600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")][2:]
    names = [cells[0].strip() for cells in rows]
    assert names == list(script.ADAPTERS)
    assert "not in DomainBed (not compared): " + ", ".join(script.NOT_IN_DOMAINBED) in proc.stdout
    for cells in rows:
        assert cells[1].strip() == "PASS", cells
        assert float(cells[2]) <= 1e-10 and float(cells[3]) > 1e-6, cells  # equal, and the parameters moved
