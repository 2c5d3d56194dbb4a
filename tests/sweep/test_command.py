"""``domaingrad sweep launch|status|delete-incomplete`` are subcommands with their own
``--help`` and options; an unknown option prints the usage of the (sub)command it was
given to (``train`` included), not the top-level one."""

from __future__ import annotations

import pytest

from domaingrad import cli


def help_of(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([*args, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def options_of(text: str) -> set[str]:
    """The long options a help text lists (first spelling of each)."""
    return {word.rstrip(",") for word in text.split() if word.startswith("--") and len(word) > 2}


def test_sweep_help_lists_the_three_subcommands(capsys):
    text = help_of(capsys, "sweep")
    assert text.startswith("usage: domaingrad sweep [-h] ACTION ...")
    for action in ("launch", "status", "delete-incomplete"):
        assert f"    {action}" in text
    assert "--launcher" not in text  # options belong to the subcommands


def test_each_subcommand_has_only_its_own_options(capsys):
    launch, status, delete = (help_of(capsys, "sweep", a) for a in ("launch", "status", "delete-incomplete"))
    assert launch.startswith("usage: domaingrad sweep launch ")
    assert status.startswith("usage: domaingrad sweep status ")
    assert delete.startswith("usage: domaingrad sweep delete-incomplete ")
    shared = {"--output-dir", "--datasets", "--algorithms", "--test-envs", "--n-hparams", "--steps", "--clean-eval"}
    for text in (launch, status, delete):
        assert shared <= options_of(text)
    launching = {"--launcher", "--workers", "--threads-per-job", "--ray-address", "--slurm-partition", "--progress"}
    assert launching <= options_of(launch) and "--list" not in options_of(launch)
    assert "--list" in options_of(status) and not (launching | {"--skip-confirmation"}) & options_of(status)
    assert "--skip-confirmation" in options_of(delete) and not (launching | {"--list"}) & options_of(delete)
    assert "--skip-confirmation" in options_of(launch)
    assert help_of(capsys, "sweep", "delete_incomplete") == delete  # DomainBed's spelling, the same subcommand


@pytest.mark.parametrize(
    "args, usage, unknown",
    [
        (["train", "--bogus"], "domaingrad train", "--bogus"),
        (["train", "--steps", "3", "--launcher", "local"], "domaingrad train", "--launcher local"),
        (["sweep", "status", "--output-dir", "x", "--launcher", "ray"], "domaingrad sweep status", "--launcher ray"),
        (["sweep", "delete-incomplete", "--output-dir", "x", "--list"], "domaingrad sweep delete-incomplete", "--list"),
        (["sweep", "launch", "--output-dir", "x", "--bogus"], "domaingrad sweep launch", "--bogus"),
        (["report", "somewhere", "--bogus"], "domaingrad report", "--bogus"),
        (["list", "--bogus"], "domaingrad list", "--bogus"),
    ],
)
def test_an_unknown_option_prints_the_usage_of_its_subcommand(capsys, args, usage, unknown):
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {usage} "), err
    assert err.rstrip().endswith(f"{usage}: error: unrecognized arguments: {unknown}"), err


def test_a_sweep_without_subcommand_says_which_exist(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["sweep", "--output-dir", "x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: domaingrad sweep [-h] ACTION ...")


def test_the_parsed_subcommand_leaves_no_private_attribute_behind():
    ns = cli.parse(cli.build_parser(), ["sweep", "status", "--output-dir", "x"])
    assert ns.command == "sweep" and ns.action == "status" and not hasattr(ns, cli.USAGE_PARSER)
    assert not hasattr(ns, "launcher") and not hasattr(ns, "skip_confirmation")
