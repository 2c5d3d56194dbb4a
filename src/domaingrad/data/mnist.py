"""DomainBed's MNIST-family datasets: Colored and Rotated (Fashion-)MNIST.

Built exactly as DomainBed's ``domainbed/datasets.py`` defines them (Gulrajani and
Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021): the pooled images are
shuffled and dealt round-robin to the environments (``images[i::n_envs]``), then each
environment is transformed. All randomness comes
from one ``torch.Generator`` seeded with the run's ``seed`` (DomainBed seeds the global
generator with ``--seed`` before building the dataset, so the construction depends on
the same value).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import DomainGradError
from .base import MultipleDomainDataset, TensorEnvironment
from .digits import Digits, check_digit_labels, load_fashion_mnist, load_mnist


class MultipleEnvironmentDigits(MultipleDomainDataset):
    """Shuffle a digit pool and deal it round-robin to ``len(settings)`` environments.

    Raises:
        DomainGradError: labels outside 0..9, or fewer digits than environments (an
            environment would get none), naming the files they came from.
    """

    SMALL_IMAGES = True
    environments: list[TensorEnvironment]

    def __init__(
        self,
        digits: Digits,
        settings: Sequence[float],
        transform: Callable[[torch.Tensor, torch.Tensor, float, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
        input_shape: tuple[int, ...],
        num_classes: int,
        seed: int,
    ):
        check_digit_labels(digits.labels, digits.source)
        n_envs = len(settings)
        if len(digits.images) < n_envs:
            files = " and ".join(digits.files) if digits.files else digits.source
            raise DomainGradError(
                f"{type(self).__name__} deals its digits round-robin to {n_envs} environments, but {files} hold "
                f"{len(digits.images)} image(s) in all, so an environment would get none; expected at least "
                f"{n_envs} (DomainBed uses MNIST's 70,000): use the complete IDX files"
            )
        generator = torch.Generator().manual_seed(seed)
        shuffle = torch.randperm(len(digits.images), generator=generator)
        images, labels = digits.images[shuffle], digits.labels[shuffle]
        self.environments = []
        for i, (name, setting) in enumerate(zip(self.ENVIRONMENTS, settings)):
            x, y = transform(images[i::n_envs], labels[i::n_envs], setting, generator)
            self.environments.append(TensorEnvironment(name, x.contiguous(), y))
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.source = digits.source


def _bernoulli(p: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """float tensor (n,) of 0/1 with P(1) = p, as DomainBed's ``torch_bernoulli_``."""
    return (torch.rand(n, generator=generator) < p).float()


def color_digits(
    images: torch.Tensor,
    labels: torch.Tensor,
    flip_color: float,
    generator: torch.Generator,
    binary_label: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """DomainBed's ``ColoredMNIST.color_dataset``.

    label = binary_label(class), flipped with probability 0.25; colour = label flipped
    with probability ``flip_color``; the image goes to channel ``colour`` of two and the
    other channel is zero.

    Args:
        images: uint8 (n, 28, 28). labels: int64 (n,). flip_color: colour-flip probability.

    Returns:
        x float32 (n, 2, 28, 28) in [0, 1]; y int64 (n,) in {0, 1}.
    """
    y = binary_label(labels).float()
    y = (y - _bernoulli(0.25, len(y), generator)).abs()
    colors = (y - _bernoulli(flip_color, len(y), generator)).abs()
    x = torch.stack([images, images], dim=1)
    x[torch.arange(len(x)), (1 - colors).long()] = 0
    return x.float().div_(255.0), y.long()


def rotate_digits(
    images: torch.Tensor, labels: torch.Tensor, angle: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """DomainBed's ``RotatedMNIST.rotate_dataset``: rotate every digit by ``angle``
    degrees counter-clockwise about the image centre, bilinear, zero fill, no expansion.

    Each uint8 image is rotated as a PIL greyscale image by torchvision's
    ``transforms.functional.rotate(image, angle, fill=(0,), interpolation=BILINEAR)``,
    the call DomainBed makes after ``ToPILImage``; ``ToTensor``'s division by 255 is
    then done once for the whole batch (the same float32 operation per pixel). The
    result is therefore bit-identical to DomainBed's per-image pipeline (checked on the
    embedded digits at all six angles by the tests). torchvision's tensor ``rotate``
    is not used: it samples differently, and its output differs from PIL's by more
    than one grey level at a few dozen pixels per environment. Measured on one core:
    about 40-90 microseconds per digit (4-6 s for the 70,000 digits of MNIST; DomainBed's
    own ``ToPILImage``/``ToTensor`` loop took about 170 microseconds per digit).

    Args:
        images: uint8 (n, 28, 28). labels: int64 (n,). angle: degrees.
        generator: unused (the rotation is deterministic); part of the transform signature.

    Returns:
        x float32 (n, 1, 28, 28) with values k/255; y int64 (n,).
    """
    import torchvision.transforms.functional as TF  # here: torchvision takes seconds to import
    from PIL import Image

    pixels = images.numpy()
    rotated = np.empty_like(pixels)
    for i, image in enumerate(pixels):
        rotated[i] = np.asarray(
            TF.rotate(
                Image.fromarray(image, mode="L"), float(angle), interpolation=TF.InterpolationMode.BILINEAR, fill=(0,)
            )
        )
    return torch.from_numpy(rotated).unsqueeze(1).float().div_(255.0), labels.clone()


class ColoredMNIST(MultipleEnvironmentDigits):
    """Colored MNIST (Arjovsky et al. 2019; DomainBed): 3 environments whose colour
    agrees with the (25%-noisy) binary label 90%, 80% and 10% of the time. Input
    2x28x28, 2 classes (digit < 5)."""

    ENVIRONMENTS = ["+90%", "+80%", "-90%"]
    COLOR_FLIP = [0.1, 0.2, 0.9]

    def __init__(self, data_dir: str | None = None, seed: int = 0):
        super().__init__(load_mnist(data_dir), self.COLOR_FLIP, self._transform, (2, 28, 28), 2, seed)

    @staticmethod
    def _transform(images, labels, flip, generator):
        return color_digits(images, labels, flip, generator, lambda c: c < 5)


class RotatedMNIST(MultipleEnvironmentDigits):
    """Rotated MNIST (Ghifary et al. 2015; DomainBed): 6 environments rotated by
    0, 15, ..., 75 degrees. Input 1x28x28, 10 classes."""

    ENVIRONMENTS = ["0", "15", "30", "45", "60", "75"]
    ANGLES = [0, 15, 30, 45, 60, 75]

    def __init__(self, data_dir: str | None = None, seed: int = 0):
        super().__init__(load_mnist(data_dir), self.ANGLES, rotate_digits, (1, 28, 28), 10, seed)


class ColoredFashionMNIST(ColoredMNIST):
    """ColoredMNIST's construction over Fashion-MNIST's 70,000 images (label = class < 5)."""

    def __init__(self, data_dir: str | None = None, seed: int = 0):
        MultipleEnvironmentDigits.__init__(
            self, load_fashion_mnist(data_dir), self.COLOR_FLIP, self._transform, (2, 28, 28), 2, seed
        )


class RotatedFashionMNIST(RotatedMNIST):
    """RotatedMNIST's construction over Fashion-MNIST's 70,000 images (10 classes)."""

    def __init__(self, data_dir: str | None = None, seed: int = 0):
        MultipleEnvironmentDigits.__init__(
            self, load_fashion_mnist(data_dir), self.ANGLES, rotate_digits, (1, 28, 28), 10, seed
        )
