"""Initial weights of featurizers: ``none``, ``imagenet`` or a state-dict file.

The weights of a run are chosen by ``--weights`` (``TrainArgs.weights``); the training
run builds the algorithm with random featurizers and then loads the weights into every
featurizer it holds (:func:`domaingrad.registry.load_initial_weights`). A featurizer
built on its own takes them as an argument: ``featurizer_for(shape, hparams, weights=...)``.

- ``none``: random initialisation (training from scratch).
- ``imagenet``: torchvision's ImageNet weights (``IMAGENET1K_V1``, what DomainBed's
  ``pretrained=True`` loads) read from the torchvision cache,
  ``torch.hub.get_dir()/checkpoints/<file>``. Nothing is ever downloaded: when the file
  is missing the error names the file, the directory and the URL to fetch it from.
- any other value: a path to a ``torch.save``-d state dict with torchvision's parameter
  names (optionally inside ``{"state_dict": ...}`` and with a ``module.`` or
  ``network.`` prefix); the classification head of the ImageNet model (``fc.*`` /
  ``classifier.6.*``) is ignored, any other missing, unexpected or mis-shaped entry is
  an error that names it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import DomainGradError

#: the backbones ``imagenet`` can load
IMAGENET_BACKBONES = ("resnet18", "resnet50", "alexnet")


def imagenet_weights(backbone: str):
    """torchvision's weights enum entry whose file ``imagenet`` reads for ``backbone``
    (imported on demand: torchvision takes seconds to import)."""
    import torchvision

    return {
        "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
        "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
        "alexnet": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
    }[backbone]


def imagenet_file(backbone: str) -> Path:
    """Where ``--weights imagenet`` looks for ``backbone``'s torchvision file, e.g.
    ``~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth`` (honours ``TORCH_HOME``)."""
    url = imagenet_weights(backbone).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def read_state_dict(spec: str, backbone: str) -> dict[str, torch.Tensor] | None:
    """The state dict ``spec`` names for ``backbone``, or None for ``none``.

    Raises:
        DomainGradError: ``imagenet`` for a backbone without ImageNet weights or with its
            file missing from the torchvision cache; an unreadable file; a file that does
            not hold a dict of tensors.
    """
    if spec == "none":
        return None
    if spec == "imagenet":
        if backbone not in IMAGENET_BACKBONES:
            raise DomainGradError(
                f"--weights imagenet: there are no ImageNet weights for {backbone}; "
                f"use --weights none or a state-dict file"
            )
        path = imagenet_file(backbone)
        if not path.is_file():
            raise DomainGradError(
                f"--weights imagenet: {path.name} is not in the torchvision cache. domaingrad never downloads "
                f"at run time: put the file {path.name} (from {imagenet_weights(backbone).url}) into "
                f"{path.parent}/, or pass --weights PATH to a state-dict file, or --weights none to train "
                f"from scratch."
            )
    else:
        path = Path(spec)
        if not path.is_file():
            raise DomainGradError(
                f"--weights {spec}: no such file; expected 'none', 'imagenet' or the path of a torch.save-d state dict"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise DomainGradError(f"--weights: cannot read {path} as a torch state dict ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DomainGradError(
            f"--weights: {path} does not hold a state dict (a dict of parameter name -> "
            f"tensor, as torch.save(model.state_dict(), path) writes)"
        )
    return _strip_prefix(state)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "network."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_backbone_state(
    module: nn.Module, state: dict[str, torch.Tensor], what: str, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Load ``state`` into ``module`` strictly, ignoring entries under ``ignore_prefixes``.

    Raises:
        DomainGradError: naming the missing, unexpected and mis-shaped entries.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore_prefixes)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} (file {tuple(state[k].shape)}, {what} {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = [
        f"{label}: {_listing(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if names
    ]
    if problems:
        raise DomainGradError(
            f"--weights: the state dict does not fit {what} ({'; '.join(problems)}). "
            f"Expected torchvision's parameter names for {what}, e.g. "
            f"{_listing(sorted(own), 3)}."
        )
    module.load_state_dict(state, strict=False)
