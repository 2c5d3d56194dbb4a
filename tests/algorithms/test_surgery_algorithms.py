"""The gradient-surgery algorithms: one update equals rule(per-domain autograd) + Adam."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from domaingrad.algorithms import ALGORITHMS, algorithm_class
from domaingrad.gradients import surgery
from domaingrad.registry import default_hparams, resolve_hparams
from domaingrad.run.output import read_records

SURGERY = ["AgrSum", "AgrRand", "PCGrad", "CorGrad", "ANDMask", "SANDMask"]


def build(name: str, overrides=None, seed: int = 0):
    torch.manual_seed(seed)
    hp = resolve_hparams(name, "RotatedMNIST", 0, 0, overrides or {})
    return algorithm_class(name)((1, 28, 28), 10, 3, hp)


def minibatches(seed: int = 0, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)) for _ in range(3)]


def manual_grads(algo, mb):
    params = [p for p in algo.network.parameters() if p.requires_grad]
    per_domain = [torch.autograd.grad(F.cross_entropy(algo.network(x), y), params) for x, y in mb]
    return params, [torch.stack(gs) for gs in zip(*per_domain)]


RULE_CALLS = {
    "AgrSum": lambda a, g: surgery.agr_sum(g),
    "PCGrad": lambda a, g: surgery.pcgrad(g, generator=a.generator),
    "ANDMask": lambda a, g: surgery.and_mask(g, tau=1.0),
    # the function's defaults are the algorithm's: the same call, nothing else passed
    "CorGrad": lambda a, g: surgery.corgrad(g, generator=a.generator),
}


@pytest.mark.parametrize("name", list(RULE_CALLS))
def test_update_is_the_rule_applied_to_per_domain_gradients(name, single_thread):
    """With the default surgery_batches "domain" the rule sees the given batches as they
    are: the update is bit for bit the rule + Adam, the rule draws only its own random
    numbers, and the statistics of the coarse and fine granularities come along."""
    from domaingrad.algorithms.surgery import granularity_stats

    algo, ref = build(name), build(name)
    mb = minibatches()
    params, grads = manual_grads(ref, mb)
    expected = RULE_CALLS[name](ref, grads)
    opt = torch.optim.Adam(params, lr=1e-3)
    for p, g in zip(params, expected.grads):
        p.grad = g
    opt.step()
    stats = algo.update(mb)
    for p, q in zip(algo.network.parameters(), ref.network.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(algo.generator.get_state(), ref.generator.get_state())
    assert "batch_generator" not in algo.training_state()["attributes"]
    assert set(expected.stats) <= set(stats) and "loss" in stats
    for key, value in expected.stats.items():  # the rule's statistics, recomputed
        assert stats[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)
    for key, value in granularity_stats(grads).items():
        assert stats[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)
    assert int(algo.update_count) == 1


def test_agr_rand_is_reproducible_and_resumable(single_thread):
    a, b = build("AgrRand"), build("AgrRand")
    mb = minibatches(1)
    assert a.update(mb) == b.update(mb)
    state = a.training_state()
    c = build("AgrRand", seed=5)
    c.load_training_state(state)
    assert a.update(minibatches(2)) == c.update(minibatches(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_corgrad_random_order_is_reproducible_and_resumable(single_thread):
    a, b = build("CorGrad"), build("CorGrad")
    a.total_steps = b.total_steps = 10
    for step in range(2):
        assert a.update(minibatches(step)) == b.update(minibatches(step))
    state = a.training_state()
    c = build("CorGrad", seed=5)
    c.total_steps = 10
    c.load_training_state(state)
    assert a.update(minibatches(3)) == c.update(minibatches(3))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_corgrad_function_and_algorithm_defaults_agree():
    defaults = {k: v.default for k, v in inspect.signature(surgery.corgrad).parameters.items()}
    hp = default_hparams("CorGrad", "PACS")
    assert defaults["projection"] == hp["corgrad_projection"] == "sequential"
    assert defaults["order"] is None and hp["corgrad_order"] == "random"
    assert defaults["slices"] == "auto" and hp["corgrad_slices"] == 0
    assert defaults["min_slice"] == hp["corgrad_min_slice"]
    assert defaults["alpha"] == hp["corgrad_alpha"]
    assert defaults["alpha_schedule"] == hp["corgrad_alpha_schedule"] == "decay"
    for key in ("slicing", "reference", "smoothing", "layerwise"):
        assert defaults[key] == hp[f"corgrad_{key}"], key
    assert hp["corgrad_params"] == "all"


def test_corgrad_official_hparams_reproduce_the_official_update(single_thread):
    # corgrad_params 'conv_linear': Conv/Linear parameters through the official rule,
    # GroupNorm affine parameters keep the LAST domain's gradient alone
    official = algorithm_class("CorGrad").OFFICIAL_HPARAMS
    algo, ref = build("CorGrad", official), build("CorGrad", official)
    mb = minibatches(4)
    params, grads = manual_grads(ref, mb)
    modules = {id(p): type(m) for m in ref.network.modules() for p in m.parameters(recurse=False)}
    conv_linear = [modules[id(p)] in (torch.nn.Conv2d, torch.nn.Linear) for p in params]
    assert any(conv_linear) and not all(conv_linear)
    options = {k: v for k, v in surgery.OFFICIAL_CORGRAD_OPTIONS.items()}
    combined = iter(surgery.corgrad([g for g, c in zip(grads, conv_linear) if c], **options).grads)
    expected = [next(combined) if c else g[-1] for g, c in zip(grads, conv_linear)]
    opt = torch.optim.Adam(params, lr=1e-3)
    for p, g in zip(params, expected):
        p.grad = g
    opt.step()
    algo.update(mb)
    for p, q in zip(algo.network.parameters(), ref.network.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert algo.hparams["corgrad_order"] == "index" and algo.hparams["corgrad_min_slice"] == 1


def test_corgrad_decay_without_a_run_length_is_an_error_not_a_silent_constant(single_thread):
    algo = build("CorGrad")
    algo.update(minibatches(0))  # step 0: alpha is the initial value whatever the length
    with pytest.raises(ValueError, match="total_steps"):
        algo.update(minibatches(1))
    algo.total_steps = 10
    assert algo.update(minibatches(1))["alpha"] == pytest.approx(0.75 * (1 - math.log(2) / math.log(10)))


def test_mean_reduction_divides_the_sum_by_the_number_of_domains(single_thread):
    grads = manual_grads(build("AgrSum"), minibatches())[1]
    total = surgery.agr_sum(grads, reduction="sum").grads
    mean = surgery.agr_sum(grads, reduction="mean").grads
    assert all(torch.allclose(t / 3, m) for t, m in zip(total, mean))
    assert build("AgrSum", {"surgery_reduction": "mean"}).hparams["surgery_reduction"] == "mean"


def test_option_hparams_are_validated():
    from domaingrad.errors import DomainGradError

    with pytest.raises(DomainGradError, match="'corgrad_smoothing' must be one of"):
        resolve_hparams("CorGrad", "ColoredMNIST", 0, 0, {"corgrad_smoothing": "both"})
    assert set(SURGERY) <= set(ALGORITHMS)
    for name in SURGERY:
        assert default_hparams(name, "ColoredMNIST")["lr"] == 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("dataset, test_env", [("ColoredMNIST", 2), ("RotatedMNIST", 0)])
@pytest.mark.parametrize("name", SURGERY)
def test_trains_through_the_cli(tmp_path, monkeypatch, run_cli, small_mnist_dir, name, dataset, test_env):
    """Through the CLI on 1,200 real digits given as a --data-dir (quick evaluation)."""
    cls = algorithm_class(name)
    update, returned = cls.update, []

    def recording_update(self, *args, **kwargs):
        values = update(self, *args, **kwargs)
        returned.append(values)
        return values

    monkeypatch.setattr(cls, "update", recording_update)
    out = tmp_path / "run"
    code, _, err = run_cli(
        "train",
        "--dataset",
        dataset,
        "--algorithm",
        name,
        "--test-envs",
        test_env,
        "--steps",
        "3",
        "--checkpoint-freq",
        "10",
        "--hparams",
        '{"batch_size": 8}',
        "--data-dir",
        small_mnist_dir,
        "--output-dir",
        out,
    )
    assert code == 0, err
    first, record = read_records(out / "results.jsonl")[0]
    assert (first["step"], record["step"]) == (0, 2) and record["args"]["algorithm"] == name
    stat = {
        "AgrSum": "agree_frac",
        "AgrRand": "agree_frac",
        "PCGrad": "mod_freq",
        "CorGrad": "mod_freq",
        "ANDMask": "mask_frac",
        "SANDMask": "mask_frac",
    }[name]
    # the records hold the rule's statistic as update() returned it: step 0 alone, then
    # the mean over the steps since the last checkpoint (steps 1 and 2)
    assert len(returned) == 3 and all(stat in values for values in returned)
    assert first[stat] == returned[0][stat]
    assert record[stat] == pytest.approx((returned[1][stat] + returned[2][stat]) / 2, rel=1e-12)
    for key in ("coarse_mod_freq", "coarse_mod_ratio", "fine_mod_freq"):  # in every surgery run's records
        assert record[key] == pytest.approx((returned[1][key] + returned[2][key]) / 2, rel=1e-12), key
    assert (out / "done").exists()


# -- the statistics of the same gradients at CorGrad's two other granularities ------------


def test_granularity_stats_known_signs():
    from domaingrad.algorithms.surgery import granularity_stats

    # element 0: all agree; 1: +,-,+ (three projections); 2: all agree; 3: 0,+,- (two)
    g = torch.tensor([[1.0, 1.0, -1.0, 0.0], [1.0, -1.0, -1.0, 2.0], [1.0, 1.0, -1.0, -3.0]])
    stats = granularity_stats([g])
    assert stats["fine_mod_freq"] == 5 / 24
    coarse = surgery.pcgrad([g], order=[0, 1, 2]).stats
    assert (stats["coarse_mod_freq"], stats["coarse_mod_ratio"]) == (coarse["mod_freq"], coarse["mod_ratio"])
    assert granularity_stats([g[:1]]) == {"coarse_mod_freq": 0.0, "coarse_mod_ratio": 0.0, "fine_mod_freq": 0.0}


@pytest.mark.parametrize("domains", [2, 3, 5])
def test_granularity_stats_are_the_surgery_rules_at_network_and_element_granularity(domains):
    """coarse = pcgrad on the whole network; fine = corgrad's sequential PCGrad on
    one-element pieces with exact projections (eps 0); neither draws a random number."""
    from domaingrad.algorithms.surgery import granularity_stats

    g = torch.Generator().manual_seed(domains)
    shapes = [(16, 3, 3, 3), (16,), (10, 16), (10,)]
    grads = [torch.randn(domains, *s, generator=g) * (torch.rand(domains, *s, generator=g) > 0.1) for s in shapes]
    grads[0] += 0.3  # correlated domains: some, not all, whole-network pairs conflict
    state = torch.get_rng_state()
    stats = granularity_stats(grads)
    assert torch.equal(torch.get_rng_state(), state)
    whole = surgery.pcgrad(grads, order=list(range(domains))).stats
    assert stats["coarse_mod_freq"] == whole["mod_freq"] and stats["coarse_mod_ratio"] == whole["mod_ratio"]
    one_element = surgery.corgrad(
        grads, order="index", slices=max(t[0].numel() for t in grads), min_slice=1, smoothing=None, eps=0.0
    ).stats
    assert one_element["pieces"] == sum(t[0].numel() for t in grads)
    assert stats["fine_mod_freq"] == pytest.approx(one_element["mod_freq"], rel=1e-12)
    assert 0 < stats["fine_mod_freq"] < 1


# -- surgery_batches: the per-domain batches (default) or mixed batches (control) ------------


def domain_batches(sizes=(5, 7, 6), seed: int = 0):
    """Batches whose every sample names its domain and index: x[:, 0, 0, 0] = domain,
    x[:, 0, 0, 1] = position in the domain's batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d, n in enumerate(sizes):
        x = torch.rand(n, 1, 28, 28, generator=g)
        x[:, 0, 0, 0] = d
        x[:, 0, 0, 1] = torch.arange(n, dtype=x.dtype)
        out.append((x, torch.randint(0, 10, (n,), generator=g)))
    return out


def test_mixed_minibatches_keep_sizes_mix_domains_and_deal_out_the_union():
    from domaingrad.algorithms.surgery import mixed_minibatches

    given = domain_batches()
    mixed = mixed_minibatches(given, torch.Generator().manual_seed(0))
    assert [tuple(x.shape) for x, _ in mixed] == [tuple(x.shape) for x, _ in given]
    assert [tuple(y.shape) for _, y in mixed] == [tuple(y.shape) for _, y in given]
    domains = [set(x[:, 0, 0, 0].long().tolist()) for x, _ in mixed]
    assert all(len(d) >= 2 for d in domains)  # every batch mixes domains (fixed seed)

    def rows(batches):
        return sorted(tuple(x[k].flatten().tolist()) + (int(y[k]),) for x, y in batches for k in range(x.shape[0]))

    assert rows(mixed) == rows(given)  # the union, each sample exactly once
    again = mixed_minibatches(given, torch.Generator().manual_seed(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(mixed, again))


def test_mixed_update_is_the_rule_on_the_mixed_batches_and_resumes_exactly(single_thread):
    from domaingrad.algorithms.surgery import mixed_minibatches

    algo, ref = build("AgrRand", {"surgery_batches": "mixed"}), build("AgrRand")
    given = domain_batches((4, 4, 4), seed=1)
    mixed = mixed_minibatches(given, torch.Generator().manual_seed(algo.batch_generator.initial_seed()))
    assert algo.update(given) == ref.update(mixed)
    assert all(torch.equal(p, q) for p, q in zip(algo.parameters(), ref.parameters()))
    # the rule's own random draws are those of the domain run with the same seed
    assert torch.equal(algo.generator.get_state(), ref.generator.get_state())
    state = algo.training_state()
    assert "batch_generator" in state["attributes"]
    resumed = build("AgrRand", {"surgery_batches": "mixed"}, seed=5)
    resumed.load_training_state(state)
    assert algo.update(domain_batches((4, 4, 4), seed=3)) == resumed.update(domain_batches((4, 4, 4), seed=3))
    assert all(torch.equal(p, q) for p, q in zip(algo.parameters(), resumed.parameters()))


def test_surgery_batches_hparam_defaults_to_the_domain_batches():
    from domaingrad.errors import DomainGradError

    for name in SURGERY:
        assert default_hparams(name, "RotatedMNIST")["surgery_batches"] == "domain"
    with pytest.raises(DomainGradError, match="'surgery_batches' must be one of"):
        resolve_hparams("PCGrad", "RotatedMNIST", 0, 0, {"surgery_batches": "single"})


def test_agr_rand_resumes_an_older_checkpoint_on_its_noise_stream():
    """A training state saved before the streams were recorded (no ``agr_rand_noise``
    entry) resumes on the sequential stream it was made with, one saved on the parallel
    stream on that one; a new run draws from the counter stream; the streams differ."""
    new = build("AgrRand")
    assert new.noise_stream == "counter" and new.training_state()["agr_rand_noise"] == "counter"
    old_state = new.training_state()
    del old_state["agr_rand_noise"]
    resumed = build("AgrRand", seed=5)
    resumed.load_training_state(old_state)
    assert resumed.noise_stream == "sequential"
    parallel = build("AgrRand", seed=5)
    parallel.load_training_state({**new.training_state(), "agr_rand_noise": "parallel"})
    assert parallel.noise_stream == "parallel"
    again = build("AgrRand", seed=5)
    again.load_training_state(new.training_state())
    assert again.noise_stream == "counter"
    for algorithm in (resumed, parallel, again):
        algorithm.update(minibatches(1))
    params = [list(a.network.parameters()) for a in (resumed, parallel, again)]
    differ = [any(not torch.equal(p, q) for p, q in zip(params[i], params[j])) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert all(differ), differ
