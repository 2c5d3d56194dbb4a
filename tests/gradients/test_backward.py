"""surgery_backward and stack_domain_gradients: gradient surgery in a user's own loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from domaingrad.gradients import stack_domain_gradients, surgery, surgery_backward
from domaingrad.gradients.surgery import (
    RULES,
    AgrRand,
    AgrSum,
    ANDMask,
    CorGrad,
    PCGrad,
    SANDMask,
    agr_rand,
    pcgrad,
)


def model_and_losses(seed: int = 0):
    """A small network (a frozen layer included) and one loss per domain (D = 3); the
    domains label the same inputs differently, so their gradients conflict."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model[0].bias.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 5, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    batches = [(x, (y + d) % 3) for d in range(3)]
    return model, [F.cross_entropy(model(x), y) for x, y in batches]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def manual_stack(model, losses):
    params = trainable(model)
    per_domain = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    return [torch.stack(gs) for gs in zip(*per_domain)]


def test_the_three_input_forms_give_the_same_grads_as_the_rule():
    model, losses = model_and_losses()
    stacked = manual_stack(model, losses)
    expected = pcgrad(stacked, order=[2, 0, 1])
    lists = [[g[d] for g in stacked] for d in range(3)]
    for form in (losses, lists, stacked):
        for p in model.parameters():
            p.grad = None
        stats = surgery_backward(form, model.parameters(), rule="pcgrad", order=[2, 0, 1])
        assert stats == expected.stats
        for p, g in zip(trainable(model), expected.grads):
            assert torch.equal(p.grad, g)
        assert model[0].bias.grad is None  # parameters that do not require grad are skipped
    assert expected.stats["conflict_pairs"] > 0  # the case exercises a projection


@pytest.mark.parametrize(
    "name, make, options",
    [
        (
            "pcgrad",
            lambda: PCGrad(generator=torch.Generator().manual_seed(3)),
            lambda: {"generator": torch.Generator().manual_seed(3)},
        ),
        (
            "corgrad",
            lambda: CorGrad(slices=2, min_slice=2, generator=torch.Generator().manual_seed(1)),
            lambda: {"slices": 2, "min_slice": 2, "generator": torch.Generator().manual_seed(1)},
        ),
        ("agr_sum", lambda: AgrSum(reduction="mean"), lambda: {"reduction": "mean"}),
        (
            "agr_rand",
            lambda: AgrRand(generator=torch.Generator().manual_seed(4)),
            lambda: {"generator": torch.Generator().manual_seed(4)},
        ),
        ("and_mask", lambda: ANDMask(tau=0.5), lambda: {"tau": 0.5}),
        ("sand_mask", lambda: SANDMask(tau=0.3, k=2.0), lambda: {"tau": 0.3, "k": 2.0}),
    ],
)
def test_objects_names_and_functions_give_identical_grads(name, make, options):
    results = []
    for rule, kwargs in ((name, options()), (RULES[name], options()), (make(), {})):
        model, losses = model_and_losses(1)
        stats = surgery_backward(losses, model.parameters(), rule=rule, **kwargs)
        results.append(([p.grad.clone() for p in trainable(model)], stats))
    for grads, stats in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0][0], grads)), name
        assert stats == results[0][1], name
    assert any(bool(g.abs().sum() > 0) for g in results[0][0])


def test_grad_is_overwritten_not_accumulated():
    model, losses = model_and_losses(2)
    for p in trainable(model):
        p.grad = torch.full_like(p, 100.0)
    rule = AgrRand(generator=torch.Generator().manual_seed(0))
    surgery_backward(losses, model.parameters(), rule=rule)
    expected = agr_rand(manual_stack(model, losses), generator=torch.Generator().manual_seed(0))
    for p, g in zip(trainable(model), expected.grads):
        assert torch.equal(p.grad, g)


def test_a_parameter_a_loss_does_not_reach_gets_a_zero_gradient():
    a, b = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([3.0]))
    stacked = stack_domain_gradients([(a * a).sum(), (a.sum() + b.sum()) * 2], [a, b])
    assert stacked[0].tolist() == [[2.0, 4.0], [2.0, 2.0]] and stacked[1].tolist() == [[0.0], [2.0]]


def test_a_user_function_gets_the_options():
    seen = {}

    def first_domain(grads, *, scale):
        seen["scale"] = scale
        return surgery.SurgeryResult([g[0] * scale for g in grads], {"calls": 1.0})

    w = torch.nn.Parameter(torch.zeros(2))
    stats = surgery_backward([w.sum(), 3 * w.sum()], [w], rule=first_domain, scale=2.0)
    assert stats == {"calls": 1.0} and seen == {"scale": 2.0} and w.grad.tolist() == [2.0, 2.0]


def test_a_corgrad_object_counts_the_backward_calls():
    rule = CorGrad(total_steps=5, alpha=0.8, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        model, losses = model_and_losses(step)
        assert surgery_backward(losses, model.parameters(), rule=rule)["alpha"] == pytest.approx(
            0.8 * (1 - math.log(step + 1) / math.log(5))
        )
    assert rule.step == 3


def w_param():
    return torch.nn.Parameter(torch.ones(2))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: surgery_backward([], [w_param()]), "at least one domain"),
        (lambda: surgery_backward([w_param().sum()], [w_param()], rule="gradnorm"), "unknown surgery rule 'gradnorm'"),
        (lambda: surgery_backward([w_param().sum()], [w_param()], rule=3), "rule must be a rule name"),
        (
            lambda: surgery_backward([w_param().sum()], [w_param()], rule=PCGrad(), generator=torch.Generator()),
            "PCGrad takes its options in its constructor",
        ),
        (
            lambda: surgery_backward([w_param().sum()], [torch.nn.Parameter(torch.ones(2), requires_grad=False)]),
            "no parameter that requires grad",
        ),
        (lambda: surgery_backward([torch.tensor(1.0)], [w_param()]), "loss 0 does not require grad"),
        (lambda: surgery_backward([w_param().sum(), w_param() * 2], [w_param()]), "losses_or_grads\\[1\\] is a tensor"),
        (
            lambda: surgery_backward([[torch.ones(2)], [torch.ones(2), torch.ones(2)]], [w_param()]),
            "losses_or_grads\\[1\\] is 2 entries",
        ),
        (lambda: surgery_backward([[torch.ones(3)]], [w_param()]), "gradient 0 of domain 0 has shape \\(3,\\)"),
        (lambda: surgery_backward([1.0, 2.0], [w_param()]), "losses_or_grads\\[0\\] is float"),
        (lambda: surgery_backward([torch.ones(2, 3)], [w_param()]), "one tensor per parameter"),
        (
            lambda: surgery_backward([w_param().sum()], [w_param()], rule=lambda g: [g[0][0]]),
            "returned a list, expected a SurgeryResult",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def per_sample_losses(seed: int = 0):
    """The network of :func:`model_and_losses` and the per-sample losses (reduction
    'none') of its three domains: a list of D = 3 tensors of shape (B,) = (6,)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 5, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    return model, [F.cross_entropy(model(x), (y + d) % 3, reduction="none") for d in range(3)]


SCALAR_PER_DOMAIN = "expected a list of D scalar losses \\(shape \\(\\)\\), one per domain"


@pytest.mark.parametrize(
    "make_input, shown",
    [
        (
            lambda losses: torch.cat(losses),
            "one tensor of shape \\(18,\\): per-sample losses\\?",
        ),  # a concatenated batch
        (lambda losses: torch.stack(losses), "one tensor of shape \\(3, 6\\): per-sample losses of 3 domains\\?"),
        (lambda losses: losses, "3 tensors of shapes \\(6,\\), \\(6,\\), \\(6,\\), not scalar losses"),
        (lambda losses: [losses[0].mean(), losses[1]], "losses_or_grads\\[1\\] is a tensor of shape \\(6,\\)"),
        (lambda losses: torch.cat(losses).mean(), "one scalar loss"),
    ],
)
def test_per_sample_losses_are_refused_with_the_shape_expected(make_input, shown):
    model, losses = per_sample_losses()
    with pytest.raises(ValueError, match=f"{shown}.*{SCALAR_PER_DOMAIN}"):
        surgery_backward(make_input(losses), model.parameters(), rule="pcgrad")
    assert all(p.grad is None for p in model.parameters())  # nothing was written


def test_a_bare_tensor_of_domain_losses_is_refused_and_the_list_the_message_advises_works():
    model, losses = per_sample_losses()
    means = torch.stack(losses).mean(dim=1)  # shape (D,): ambiguous with per-sample losses of one batch
    with pytest.raises(ValueError, match="one tensor of shape \\(3,\\).*pass list\\(losses\\)"):
        surgery_backward(means, model.parameters(), rule="agr_sum")
    expected = surgery_backward([loss.mean() for loss in losses], model.parameters(), rule="agr_sum")
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    assert surgery_backward(list(means), model.parameters(), rule="agr_sum") == expected
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_misshapen_stacked_gradients_name_the_shapes_expected():
    model, _ = model_and_losses()
    wrong = [torch.zeros(3, 4), torch.zeros(3, 3, 4), torch.zeros(3, 3)]  # the first should be (3, 4, 5)
    with pytest.raises(ValueError, match="\\(D, 4, 5\\), \\(D, 3, 4\\), \\(D, 3\\); got 3 items of shapes \\(3, 4\\)"):
        surgery_backward(wrong, model.parameters())
