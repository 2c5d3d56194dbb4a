"""Colored and Rotated MNIST measured against their DomainBed definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from torchvision import transforms
from torchvision.transforms.functional import rotate

from domaingrad.data import InfiniteMinibatches, get_dataset, split_environment
from domaingrad.data.digits import load_embedded_mnist
from domaingrad.rng import seed_hash


@pytest.fixture(scope="module")
def pool():
    return load_embedded_mnist()


def dealt(pool, seed: int, n_envs: int, env: int):
    """The digits DomainBed deals to environment ``env``: shuffled, then every n-th."""
    perm = torch.randperm(len(pool.images), generator=torch.Generator().manual_seed(seed))
    return pool.images[perm][env::n_envs], pool.labels[perm][env::n_envs]


def within(observed: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def colored():
    return get_dataset("ColoredMNIST", seed=3)


def test_colored_mnist_shapes_and_round_robin_dealing(colored, pool):
    assert colored.environment_names == ["+90%", "+80%", "-90%"]
    assert colored.input_shape == (2, 28, 28) and colored.num_classes == 2
    assert [len(e) for e in colored.environments] == [3334, 3333, 3333]
    for i, env in enumerate(colored.environments):
        images, _ = dealt(pool, 3, 3, i)
        # exactly one channel carries the digit, the other is zero
        assert torch.equal(env.x.sum(1), images.float() / 255)
        assert bool(((env.x[:, 0] == 0).all(dim=(1, 2)) | (env.x[:, 1] == 0).all(dim=(1, 2))).all())


def test_colored_mnist_colour_agreement_and_label_noise(colored, pool):
    for i, (env, flip) in enumerate(zip(colored.environments, [0.1, 0.2, 0.9])):
        _, digit = dealt(pool, 3, 3, i)
        colour = (env.x[:, 1].flatten(1).sum(1) > 0).long()  # channel 1 lit = colour 1
        agreement = (colour == env.y).float().mean().item()
        noise = (env.y != (digit < 5).long()).float().mean().item()
        assert within(agreement, 1 - flip, len(env)), (i, agreement)
        assert within(noise, 0.25, len(env)), (i, noise)


def test_rotated_mnist_is_bit_identical_to_domainbeds_pil_rotation(pool):
    data = get_dataset("RotatedMNIST", seed=1)
    assert data.environment_names == ["0", "15", "30", "45", "60", "75"]
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10

    def domainbed(images, angle):  # DomainBed's rotate_dataset, one PIL image at a time
        rot = transforms.Compose(
            [
                transforms.ToPILImage(),
                transforms.Lambda(
                    lambda x: rotate(
                        x, angle, fill=(0,), interpolation=torchvision.transforms.InterpolationMode.BILINEAR
                    )
                ),
                transforms.ToTensor(),
            ]
        )
        return torch.stack([rot(im) for im in images])

    for i, angle in enumerate([0, 15, 30, 45, 60, 75]):
        images, labels = dealt(pool, 1, 6, i)
        env = data.environments[i]
        assert torch.equal(env.y, labels) and env.x.dtype == torch.float32
        n = 400  # of ~1,667 per environment: DomainBed's loop costs ~0.2 ms per digit
        assert torch.equal(env.x[:n], domainbed(images[:n], angle)), angle
        if angle:  # the angle is really that one: 15 degrees more is far off
            assert (env.x[:n] - domainbed(images[:n], angle + 15)).abs().max().item() > 0.3


def test_dataset_is_a_function_of_its_seed():
    a, b = get_dataset("ColoredMNIST", seed=5), get_dataset("ColoredMNIST", seed=5)
    c = get_dataset("ColoredMNIST", seed=6)
    assert torch.equal(a[2].x, b[2].x) and torch.equal(a[2].y, b[2].y)
    assert not torch.equal(a[2].y, c[2].y)


def test_splits_follow_domainbed_and_are_deterministic(colored):
    env = colored[1]
    out1, in1 = split_environment(env, 0.2, trial_seed=4, env_index=1)
    out2, in2 = split_environment(env, 0.2, trial_seed=4, env_index=1)
    out3, _ = split_environment(env, 0.2, trial_seed=5, env_index=1)
    assert torch.equal(out1.indices, out2.indices) and torch.equal(in1.indices, in2.indices)
    assert not torch.equal(out1.indices, out3.indices)
    assert len(out1) == int(len(env) * 0.2)
    assert set(out1.indices.tolist()).isdisjoint(in1.indices.tolist())
    assert sorted(out1.indices.tolist() + in1.indices.tolist()) == list(range(len(env)))
    keys = list(range(len(env)))
    np.random.RandomState(seed_hash(4, 1)).shuffle(keys)  # DomainBed misc.split_dataset
    assert out1.indices.tolist() == keys[: len(out1)]


def test_minibatches_are_seeded_resumable_and_from_the_split(colored):
    _, split = split_environment(colored[0], 0.2, 0, 0)
    _, split2 = split_environment(colored[1], 0.2, 0, 1)
    stream = InfiniteMinibatches([split, split2], batch_size=32, seed=7)
    first = next(stream)
    assert [x.shape for x, _ in first] == [(32, 2, 28, 28)] * 2
    state = stream.state_dict()
    expected = [next(stream) for _ in range(3)]
    other = InfiniteMinibatches([split, split2], batch_size=32, seed=7)
    other.load_state_dict(state)
    for got, want in zip([next(other) for _ in range(3)], expected):
        assert all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want))
    # every sampled row is a row of the in split
    in_rows = colored[0].x[split.indices].flatten(1)
    x, _ = expected[0][0]
    matches = (x.flatten(1)[:, None, :] == in_rows[None]).all(-1).any(-1)
    assert bool(matches.all())


def test_class_balanced_minibatches_balance_classes():
    env = get_dataset("ColoredMNIST", seed=0)[0]
    idx = torch.cat([torch.nonzero(env.y == 0).flatten()[:100], torch.nonzero(env.y == 1).flatten()[:900]])
    from domaingrad.data import Split

    split = Split(env, idx)
    balanced = InfiniteMinibatches([split], 4000, seed=0, class_balanced=True)
    plain = InfiniteMinibatches([split], 4000, seed=0)
    assert within(next(balanced)[0][1].float().mean().item(), 0.5, 4000)
    assert within(next(plain)[0][1].float().mean().item(), 0.9, 4000)


def test_unknown_dataset_lists_valid_names():
    from domaingrad.errors import DomainGradError

    with pytest.raises(DomainGradError, match="valid datasets: ColoredMNIST, RotatedMNIST"):
        get_dataset("ColouredMNIST")
