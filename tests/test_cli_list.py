"""``domaingrad list``: whole descriptions (never cut), and ``list NAME`` / ``--verbose``
with every hyperparameter's default, random-search distribution and meaning."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from domaingrad.algorithms import ALGORITHMS
from domaingrad.data import DATASETS
from domaingrad.hparams import HParam, common_hparams
from domaingrad.listing import describe_draw, plain_text
from domaingrad.plugins import first_paragraph
from domaingrad.registry import hparam_specs


def flat(text: str) -> str:
    return " ".join(text.split())


def hparam_line(out: str, name: str) -> str:
    (line,) = [line for line in out.splitlines() if re.match(rf"^  {re.escape(name)} +default ", line)]
    return line


def test_the_plain_list_keeps_every_description_whole(run_cli):
    code, out, _ = run_cli("list")
    assert code == 0
    text = flat(out)
    fishr = '"Fishr: Invariant Gradient Variances for Out-of-Distribution Generalization", ICML 2022'
    assert fishr in text  # the reference the old 96-character cut lost
    for name, cls in ALGORITHMS.items():
        assert flat(f"{name} {plain_text(first_paragraph(cls.__doc__))}") in text, name  # whole, markup removed
    for name, (_, line) in DATASETS.items():
        assert flat(f"{name} {line}") in text, name
    assert not re.search(r" \.\.\.$", out, flags=re.M)  # no line ends cut
    assert "domaingrad list NAME" in text and "domaingrad list --help" in text


def test_list_algorithm_prints_its_paper_and_every_hyperparameter(run_cli):
    code, out, err = run_cli("list", "Fishr")
    assert code == 0, err
    text = flat(out)
    assert 'Rame, Dancette, Cord, "Fishr: Invariant Gradient Variances for Out-of-Distribution Generalization"' in text
    assert "ICML 2022" in text and "irm_setup" in text  # the docstring beyond its first paragraph
    specs = hparam_specs("Fishr", "ColoredMNIST")
    for spec in specs.values():
        line = hparam_line(out, spec.name)
        assert f"default {str(spec.default).lower() if isinstance(spec.default, bool) else spec.default}" in (
            line.replace('"', "")
        ), line
        assert flat(spec.help) in text, spec.name
    assert "search 10**U(1.0, 4.0)" in hparam_line(out, "lambda")  # Fishr's lambda: DomainBed's 10**U(1, 4)
    assert "search U(0.9, 0.99)" in hparam_line(out, "ema")
    assert "search int(U(0.0, 5000.0))" in hparam_line(out, "penalty_anneal_iters")
    assert "search 10**U(-4.5, -2.5)" in hparam_line(out, "lr")
    assert "search int(2**U(3, 9))" in hparam_line(out, "batch_size")
    assert "search fixed" in hparam_line(out, "fishr_penalty") and 'choices: "domainbed", "irm_setup"' in out
    assert out.index("Fishr's own:") < out.index("  lambda ") < out.index("common to every algorithm:")


def test_list_takes_any_case_and_another_dataset_s_values(run_cli):
    code, lower, _ = run_cli("list", "fishr")
    assert code == 0 and lower == run_cli("list", "Fishr")[1]
    code, out, _ = run_cli("list", "Fishr", "--dataset", "pacs")
    assert code == 0 and "hyperparameters on PACS" in out
    assert "search 10**U(-5, -3.5)" in hparam_line(out, "lr") and "default 5e-05" in hparam_line(out, "lr")
    assert "search int(2**U(3, 5.5))" in hparam_line(out, "batch_size")


def test_list_dataset_prints_its_environments_and_the_common_hyperparameters(run_cli):
    code, out, err = run_cli("list", "debug28")
    assert code == 0, err
    assert out.startswith("Debug28 (dataset") and "0=0, 1=1, 2=2" in out and "--steps 5001" in out
    for spec in common_hparams(True, "Debug28"):
        assert hparam_line(out, spec.name)
    code, out, _ = run_cli("list", "PACS")
    assert "0=art_painting, 1=cartoon, 2=photo, 3=sketch" in out and "--checkpoint-freq 300" in out


def test_list_verbose_prints_everything_in_full(run_cli):
    code, out, err = run_cli("list", "--verbose")
    assert code == 0, err
    headers = [line.split(" (")[0] for line in out.splitlines() if re.match(r"^\S+ \((algorithm|dataset), ", line)]
    assert headers == list(DATASETS) + list(ALGORITHMS)
    text = flat(out)
    assert '"Fishr: Invariant Gradient Variances for Out-of-Distribution Generalization", ICML 2022' in text
    for name in ("Fishr", "CorGrad", "DMG"):
        own = hparam_specs(name, "ColoredMNIST")
        block = out.split(f"\n{name} (algorithm", 1)[1].split("\n---", 1)[0]
        for spec in own.values():
            if spec.name not in {s.name for s in common_hparams(True, "ColoredMNIST")}:
                assert re.search(rf"^  {spec.name} +default ", block, flags=re.M), (name, spec.name)
    tail = out.rsplit("\n---", 1)[1]  # the hyperparameters every algorithm has, once
    assert "hyperparameters every algorithm has" in tail and re.search(r"^  lr +default 0.001", tail, flags=re.M)


def test_list_unknown_name_suggests_the_closest(run_cli):
    code, _, err = run_cli("list", "Fisher")
    assert code == 2 and err.strip().endswith("did you mean Fishr?")
    code, _, err = run_cli("list", "--dataset", "PACS")
    assert code == 2 and "domaingrad list NAME" in err


SIZES = (1, 3, 5)


def drawn_by_a_function(r: np.random.RandomState) -> int:
    return int(r.choice([2, 4]))


@pytest.mark.parametrize(
    "spec, expected",
    [
        (HParam("a", 0.5, lambda r: float(r.uniform(0.1, 0.9))), "U(0.1, 0.9)"),
        (HParam("b", 3, lambda r: int(r.choice(SIZES))), "int(choice(SIZES))"),  # a module global keeps its name
        (HParam("c", 1e-3, lambda r: 1e-3), "fixed"),
        (HParam("d", 0.0, lambda r: 0.25), "always 0.25"),
        (HParam("e", 2, drawn_by_a_function), "one of 2, 4 (seen in 200 draws)"),
        (HParam("f", False, lambda r: bool(r.choice([False, False]))), "fixed: choice([False, False])"),
    ],
)
def test_describe_draw_reads_the_draw_s_source(spec, expected):
    assert describe_draw(spec) == expected


@pytest.mark.skipif(sys.version_info < (3, 11), reason="code positions (co_positions) need Python 3.11")
def test_describe_draw_substitutes_closure_values_and_tells_lambdas_on_one_line_apart():
    def make(sizes):
        return HParam("s", sizes[0], lambda r: int(r.choice(sizes)))

    assert describe_draw(make([3, 5, 7])) == "int(choice([3, 5, 7]))"
    first, second = (lambda r: float(r.uniform(0, 1)), lambda r: float(10 ** r.uniform(-2, 2)))
    assert describe_draw(HParam("x", 0.5, first)) == "U(0, 1)"
    assert describe_draw(HParam("y", 1.0, second)) == "10**U(-2, 2)"
