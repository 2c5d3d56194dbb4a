"""The ``domaingrad`` command line: ``train``, ``list``, ``download``, ``reproduce``,
``sweep``, ``report`` and ``analyze``.

DomainBed's underscore spellings (``--test_envs``, ``--output_dir``, ...) are accepted
beside the dashed ones.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import DomainGradError, report_error, show_warnings_plainly
from .layout import SPLIT_70_10_20, SPLIT_DOMAINBED, SPLIT_PROTOCOLS

#: commands that live in their own module: name -> module exposing
#: ``add_parser(subparsers)`` (cheap imports only) and ``run(namespace)``
MODULE_COMMANDS = {
    "sweep": "domaingrad.sweep.command",
    "report": "domaingrad.report.command",
    "analyze": "domaingrad.analysis.command",
}


def _auto_or_int(text: str) -> int | None:
    """``auto`` -> None, else a positive integer (argparse type of --eval-batch-size)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None


def _option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--name-with-dashes`` with DomainBed's ``--name_with_underscores`` as an alias."""
    flags = [f"--{name.replace('_', '-')}"]
    if "_" in name:
        flags.append(f"--{name}")
    parser.add_argument(*flags, dest=name, **kwargs)


#: the long help of ``domaingrad list``: where domaingrad departs from DomainBed in ways a
#: user comparing with DomainBed must know (facts checked against DomainBed's
#: ``domainbed/algorithms.py`` and ``scripts/train.py``)
LIST_DESCRIPTION = """\
List the registered datasets and algorithms.

Documented deviations from DomainBed (Gulrajani and Lopez-Paz, "In Search of Lost
Domain Generalization", ICLR 2021):

  MLDG with two training domains: DomainBed uses n_meta_test meta-test domains
  (default 2), which leaves no meta-train domain when only two domains are trained on
  (e.g. Colored MNIST with one test environment): its MLDG then has no
  meta-train/meta-test pair, a zero gradient and never learns. domaingrad uses
  min(n_meta_test, D - 1) meta-test domains, so with two training domains MLDG has one
  meta-train and one meta-test domain; with three or more nothing changes.

  model.pkl layout: the file has DomainBed's keys (args, model_input_shape,
  model_num_classes, model_num_domains, model_hparams, model_dict), but is not always
  loadable by DomainBed's classes. "args" holds domaingrad's train arguments
  (DomainBed's plus its own, e.g. image_size, weights, clean_eval); on image datasets
  model_input_shape is (3, image_size, image_size) (DomainBed: always (3, 224, 224)).
  "model_dict" matches DomainBed's state_dict for ERM, CORAL, MMD, Mixup, MLDG, SD and
  RSC, but not for: IRM, VREx, DANN, SANDMask, Fishr (update_count is a 0-d tensor,
  DomainBed's has shape (1,)); ANDMask (an extra update_count); Fishr (an extra
  ema_variances buffer); DANN (no class_embeddings.weight, which only CDANN uses);
  GroupDRO (q has shape (D,) from the start, DomainBed's is empty until the first
  update); Fish (the ERM layout featurizer/classifier/network plus network_inner,
  DomainBed's a WholeFish network.net). Algorithms DomainBed does not have use their
  own layout.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="domaingrad", description="Gradient-based domain generalization.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train one model (one DomainBed job)",
        description="Train on the non-test environments; evaluate every environment "
        "at each checkpoint; resume if killed.",
    )
    _option(
        train,
        "dataset",
        default="ColoredMNIST",
        help="dataset name (see `domaingrad list`), folder:PATH for your own <domain>/<class>/<image> folder, "
        "or package.module:Class for your own dataset class",
    )
    _option(
        train,
        "algorithm",
        default="ERM",
        help="algorithm name (see `domaingrad list`), or package.module:Class for your own algorithm class "
        "(the module must be importable: installed or on PYTHONPATH)",
    )
    _option(train, "test_envs", type=int, nargs="+", default=[0], metavar="I", help="held-out environment(s)")
    _option(train, "steps", type=int, default=None, help="training steps (default: the dataset's, 5001)")
    _option(
        train,
        "checkpoint_freq",
        type=int,
        default=None,
        help="evaluate and checkpoint every K steps (default: the dataset's, 100)",
    )
    _option(train, "hparams", default=None, help="JSON object overriding hyperparameters, e.g. '{\"lr\": 1e-3}'")
    _option(train, "hparams_seed", type=int, default=0, help="0 = defaults, else a random-search draw")
    _option(train, "trial_seed", type=int, default=0, help="seed of the in/out splits and hparam draws")
    _option(train, "seed", type=int, default=0, help="seed of data construction, init and minibatches")
    _option(
        train,
        "data_dir",
        default=None,
        help="root holding MNIST/raw, PACS/, VLCS/ etc.; omitted: the embedded 10,000 MNIST digits",
    )
    _option(train, "output_dir", default="train_output", help="where results.jsonl etc. go")
    _option(train, "holdout_fraction", type=float, default=0.2, help="fraction of each env held out (out split)")
    _option(
        train,
        "task",
        default="domain_generalization",
        choices=["domain_generalization", "domain_adaptation"],
        help="DomainBed's task: domain_adaptation passes the uda split of each test environment, unlabelled, "
        "to the algorithm's update (only algorithms that use it, e.g. CORAL and MMD; needs "
        "--uda-holdout-fraction)",
    )
    _option(
        train,
        "uda_holdout_fraction",
        type=float,
        default=0.0,
        help="share of each test environment's in split set aside as its unlabelled uda split, evaluated as "
        "env{k}_uda_acc (DomainBed; default 0: none)",
    )
    _option(train, "skip_model_save", action="store_true", help="do not write model.pkl")
    _option(train, "save_model_every_checkpoint", action="store_true", help="write model_step{N}.pkl")
    _option(
        train,
        "eval_batch_size",
        type=_auto_or_int,
        default=None,
        help="batch size of evaluation passes; auto (default): 64 on CPU, 512 on CUDA",
    )
    _option(
        train,
        "amp",
        default="off",
        choices=["off", "bf16", "fp16"],
        help="mixed precision: bf16 autocast (CPU or CUDA), fp16 autocast with loss scaling "
        "(fp16-ready algorithms, e.g. ERM), off (float32; default)",
    )
    _option(
        train,
        "channels_last",
        default="auto",
        choices=["auto", "on", "off"],
        help="NHWC memory format for image backbones; auto: on for CUDA, off on CPU",
    )
    _option(
        train,
        "deterministic",
        action="store_true",
        help="deterministic kernels only, cudnn.benchmark off (on for CUDA runs otherwise)",
    )
    _option(train, "device", default="auto", help="auto, cpu or cuda[:N]")
    _option(
        train,
        "weights",
        default=None,
        metavar="none|imagenet|PATH",
        help="initial featurizer weights: none (from scratch), imagenet (torchvision's file in "
        "torch.hub.get_dir()/checkpoints; never downloaded) or a state-dict file; default: "
        "imagenet for ResNet/AlexNet (DomainBed), none for MNIST_CNN",
    )
    _option(
        train,
        "image_size",
        type=int,
        default=224,
        help="image datasets: side of the network input (DomainBed: 224; e.g. 64 for CPU runs)",
    )
    _option(
        train,
        "num_workers",
        type=int,
        default=None,
        help="image datasets: DataLoader worker processes (default: 8, at most the CPU count; 0 = none)",
    )
    _option(
        train,
        "class_map",
        default=None,
        metavar="FILE",
        help="image folders: JSON mapping 'classfolder' or 'domain/classfolder' to a class name",
    )
    _option(
        train,
        "corrupt_images",
        default="error",
        choices=["error", "skip"],
        help="image folders: stop on unreadable images (error) or leave them out and log them (skip)",
    )
    _option(
        train,
        "split_protocol",
        default=SPLIT_DOMAINBED,
        choices=SPLIT_PROTOCOLS,
        help=f"{SPLIT_DOMAINBED}: in/out split by --holdout-fraction; {SPLIT_70_10_20}: the "
        "train/validation/test parts per domain of Mansilla et al., 'Domain Generalization via Gradient "
        "Surgery', ICCV 2021, Section 4.1 (records gain env{i}_test_acc)",
    )
    _option(
        train,
        "clean_eval",
        action="store_true",
        help="image datasets: evaluate the training environments on clean images; by default they are "
        "evaluated on augmented images when hparam data_augmentation is on, as DomainBed does (its "
        "published tables), which changes the checkpoints training-domain validation selects; test "
        "environments are never augmented",
    )
    progress = train.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always show the progress bar (default: only on a terminal)",
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false")

    listing = sub.add_parser(
        "list",
        help="list datasets and algorithms; `list NAME` for one in full, with its hyperparameters",
        description=LIST_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listing.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="an algorithm or dataset (any case): print its whole description and every hyperparameter "
        "with its default, random-search distribution and meaning",
    )
    listing.add_argument(
        "--verbose", "-v", action="store_true", help="every dataset and algorithm in full, as `list NAME` does"
    )
    listing.add_argument(
        "--dataset",
        default=None,
        help="show an algorithm's hyperparameter values on this dataset (default ColoredMNIST; image datasets "
        "such as PACS have other learning rates and batch sizes)",
    )

    reproduce = sub.add_parser("reproduce", help="rerun a published experiment and print it beside the paper")
    reproduce.add_argument("experiment", help="experiment name (`domaingrad reproduce --list` shows them)", nargs="?")
    reproduce.add_argument("--list", action="store_true", help="list the experiments")
    _option(reproduce, "data_dir", default=None, help="root holding MNIST/raw; omitted: the embedded digits")
    reproduce.add_argument("--restarts", type=int, default=10, help="independent runs (the papers use 10)")
    reproduce.add_argument("--steps", type=int, default=501, help="training steps per run")
    reproduce.add_argument("--seed", type=int, default=0, help="run r uses seed + r")
    reproduce.add_argument(
        "--methods",
        default=None,
        metavar="M[,M...]",
        help="comma-separated methods to run (fishr-colored-mnist: erm, irm, vrex, fishr); default: all",
    )
    reproduce.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes running the runs in parallel, one thread each "
        "(default: the number of cores); results do not depend on it",
    )
    _option(
        reproduce,
        "label_noise",
        default=None,
        choices=("fixed", "per-step"),
        help="label noise and colours drawn once per restart (the paper's) or afresh at every step; "
        "default: fixed on full MNIST, per-step on the embedded 10,000 digits",
    )
    reproduce.add_argument(
        "--markdown",
        default=None,
        metavar="FILE",
        help="also write the table to FILE (refuses to overwrite an existing file)",
    )
    download = sub.add_parser(
        "download",
        help="fetch a dataset into --data-dir, laid out as DomainBed's scripts/download.py lays it out",
        description="Fetch DATASET (MNIST, VLCS, PACS, OfficeHome, DomainNet, TerraIncognita, SVIRO, Spawrious, "
        "WILDSCamelyon, WILDSFMoW) into --data-dir with DomainBed's URLs and layout. Offline, it fails at once "
        "naming the URL and where to put the file by hand; a file already there is used (checksum checked when known).",
    )
    download.add_argument("dataset", metavar="DATASET", help="the dataset to fetch (case-insensitive)")
    _option(download, "data_dir", required=True, help="the directory to fetch into (the --data-dir of train)")
    _option(
        download, "keep_archives", action="store_true", help="keep the archives once unpacked (DomainBed deletes them)"
    )
    _option(
        download,
        "timeout",
        type=float,
        default=10.0,
        help="seconds to wait for a server, one try per file (default 10)",
    )
    for module in MODULE_COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    _mark_usage(parser)
    return parser


#: namespace attribute naming the innermost (sub)command parser that parsed the line
USAGE_PARSER = "_usage_parser"


def _mark_usage(parser: argparse.ArgumentParser) -> None:
    """Let every subcommand parser, nested ones too (``sweep launch``), record itself in
    the namespace, so that :func:`parse` reports unknown options with its usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                sub.set_defaults(**{USAGE_PARSER: sub})
                _mark_usage(sub)


def cmd_list(ns: argparse.Namespace) -> None:
    """Print ``domaingrad list [NAME ...] [--verbose] [--dataset D]`` (see :mod:`domaingrad.listing`).

    Raises:
        DomainGradError: an unknown name, with the closest names suggested.
    """
    from .listing import run_list

    print(run_list(list(ns.names), ns.verbose, ns.dataset))


def cmd_reproduce(ns: argparse.Namespace) -> None:
    from .reproduce import EXPERIMENTS

    if ns.list or not ns.experiment:
        for name, (_, text) in EXPERIMENTS.items():
            print(f"  {name:<24} {text}")
        return
    if ns.experiment not in EXPERIMENTS:
        raise DomainGradError(f"unknown experiment {ns.experiment!r}; valid experiments: {', '.join(EXPERIMENTS)}")
    workers = ns.workers if ns.workers is not None else (os.cpu_count() or 1)
    if ns.restarts < 1 or ns.steps < 1 or workers < 1:
        raise DomainGradError("--restarts, --steps and --workers must be positive integers")
    if ns.markdown and Path(ns.markdown).exists():
        raise DomainGradError(f"--markdown {ns.markdown} exists; choose a new file name (nothing is overwritten)")
    module = EXPERIMENTS[ns.experiment][0]
    extra = {}
    if ns.methods is not None:
        extra["methods"] = [m.strip() for m in ns.methods.split(",") if m.strip()]
        if not extra["methods"]:
            raise DomainGradError("--methods needs at least one method name, e.g. --methods vrex,fishr")
    results = module.run(
        data_dir=ns.data_dir,
        restarts=ns.restarts,
        steps=ns.steps,
        seed=ns.seed,
        label_noise=ns.label_noise,
        workers=workers,
        **extra,
    )
    table = module.format_table(results)
    print()
    print(table)
    if ns.markdown:
        Path(ns.markdown).write_text(table + "\n")


def cmd_train(ns: argparse.Namespace) -> None:
    from .algorithms import resolve_algorithm_name
    from .data import resolve_dataset_name
    from .hparams import parse_hparams_json
    from .run import TrainArgs, train

    fields = {k: v for k, v in vars(ns).items() if k not in ("command", USAGE_PARSER)}
    fields["hparams"] = parse_hparams_json(ns.hparams)  # JSON text stops here: a dict from now on
    # the canonical spellings (--algorithm erm -> ERM) are what records and model.pkl keep
    fields["dataset"] = resolve_dataset_name(ns.dataset)
    fields["algorithm"] = resolve_algorithm_name(ns.algorithm)
    train(TrainArgs(**fields))


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that an unknown option is reported with the
    usage of the (sub)command it was given to (``domaingrad train --bogus`` prints
    ``train``'s usage, not the top-level one); exits 2 as argparse does."""
    ns, extra = parser.parse_known_args(argv)
    if extra:
        getattr(ns, USAGE_PARSER, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(ns, USAGE_PARSER):
        delattr(ns, USAGE_PARSER)
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parse(parser, argv)
    try:
        if ns.command == "list":
            cmd_list(ns)
        elif ns.command == "train":
            cmd_train(ns)
        elif ns.command == "reproduce":
            cmd_reproduce(ns)
        elif ns.command == "download":
            from .data.download import run as run_download

            return run_download(ns)
        else:
            code = importlib.import_module(MODULE_COMMANDS[ns.command]).run(ns)
            return int(code or 0)
    except DomainGradError as exc:
        return report_error(exc)
    except BrokenPipeError:  # e.g. `domaingrad list | head`: the reader has gone
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("domaingrad: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


def console_main() -> int:
    """The ``domaingrad`` executable: :func:`main` with domaingrad's warnings printed as
    ``domaingrad: warning: ...`` (in-process callers of :func:`main` keep Python's
    warning machinery, e.g. ``pytest.warns``)."""
    show_warnings_plainly()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
