"""Assemble a report: selection outcomes, tables and tests for every requested selection method."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DomainGradError
from .checks import loo_missing_pairs_note, mixed_args, mixed_args_message, no_single_test_env_note
from .names import order_algorithms
from .records import Flag, Sweep
from .selection import Selected, SelectionMethod, protocol_of, resolve_methods, select
from .stats import PairedTest, attach_p_values, paired_tests, too_few_pairs_note
from .tables import Table, build_tables


@dataclass
class Section:
    """Everything reported for one selection method."""

    method: type[SelectionMethod]
    selected: list[Selected]
    tables: list[Table]
    tests: list[PairedTest] = field(default_factory=list)
    in_domain_tables: list[Table] = field(default_factory=list)
    in_domain_tests: list[PairedTest] = field(default_factory=list)


@dataclass
class Report:
    """A whole report: the sweep read, its protocol, one section per selection method, flags and notes.

    ``flags`` (:class:`.records.Flag`) are the sweep's (done jobs without a record, repeated
    steps) and the report's own (merged mixed arguments, why cells are X); ``notes`` are
    further remarks (too few trials for the Wilcoxon test).
    """

    sweep: Sweep
    protocol: str
    sections: list[Section]
    baseline: str | None
    in_domain: bool
    notes: list[str] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)

    def all_notes(self) -> list[str]:
        """Every flag's message (prefixed ``Warning:`` or ``Note:``), then the notes: what each format prints."""
        return [f"{f.level.capitalize()}: {f.message}" for f in self.flags] + list(self.notes)


def build_report(
    sweep: Sweep,
    selection: str = "auto",
    baseline: str | None = None,
    in_domain: bool = False,
    allow_mixed: bool = False,
) -> Report:
    """Select, tabulate and test.

    Args:
        sweep: the records read by :func:`.records.load_sweep`.
        selection: ``auto``, ``all``, ``iid``, ``loo``, ``oracle`` or ``70/10/20`` (see
            :func:`.selection.resolve_methods`).
        baseline: algorithm every other one is tested against (paired Wilcoxon), or None.
        in_domain: also build DMG's in-domain tables (source held-out accuracy).
        allow_mixed: merge the runs of a dataset even when they differ in arguments other
            than the swept ones (:func:`.checks.mixed_args`); the report then flags it.

    Raises:
        DomainGradError: no usable record, unknown selection, a baseline absent from the
            sweep, or (without ``allow_mixed``) runs of a dataset that differ in an
            argument a sweep keeps fixed, naming it and the job directories.
    """
    records = sweep.records
    if not records:
        raise DomainGradError(
            f"no usable results.jsonl record in {sweep.root}"
            + _why_empty(sweep)
            + "; expected one sub-directory per job holding results.jsonl (DomainBed's layout)"
        )
    algorithms = order_algorithms(r["args"]["algorithm"] for r in records)
    if baseline is not None and baseline not in algorithms:
        raise DomainGradError(
            f"--baseline {baseline!r} has no runs in this sweep; algorithms present: {', '.join(algorithms)}"
        )
    differences = mixed_args(sweep)
    message = mixed_args_message(sweep.root, differences) if differences else ""
    if differences and not allow_mixed:
        raise DomainGradError(
            message + ". Report each set of runs from its own sweep directory, or pass --allow-mixed to merge "
            "them anyway (the report then says so)"
        )
    report = Report(sweep, protocol_of(records), [], baseline, in_domain, flags=list(sweep.flags))
    if differences:
        jobs = sorted({j for _, _, by_value in differences for js in by_value.values() for j in js})
        report.flags.append(Flag("mixed_args", message + " (merged: --allow-mixed)", tuple(jobs)))
    single = no_single_test_env_note(records)
    if single is not None:
        report.flags.append(single)
    for method in resolve_methods(selection, records):
        chosen = select(records, method)
        loo = loo_missing_pairs_note(records, chosen, method)
        if loo is not None:
            report.flags.append(loo)
        section = Section(method, chosen, build_tables(records, chosen, method.name, "test_acc"))
        if in_domain:
            section.in_domain_tables = build_tables(records, chosen, method.name, "in_domain_acc")
        if baseline is not None:
            section.tests = paired_tests(chosen, baseline, "test_acc")
            attach_p_values(section.tables, section.tests)
            if in_domain:
                section.in_domain_tests = paired_tests(chosen, baseline, "in_domain_acc")
                attach_p_values(section.in_domain_tables, section.in_domain_tests)
        report.sections.append(section)
    if baseline is not None:
        note = too_few_pairs_note([t for s in report.sections for t in s.tests])
        if note:
            report.notes.append(note)
    return report


def _why_empty(sweep: Sweep) -> str:
    unfinished = [j for j in sweep.jobs if not j.done and j.n_records]
    if unfinished and not sweep.include_incomplete:
        return f" ({len(unfinished)} job(s) have records but no `done` file yet; --latest uses them)"
    without = [j for j in sweep.jobs if not j.done and not j.n_records]
    if without:
        return f" ({len(without)} job(s) have no record yet)"
    if sweep.problems:
        return f" ({len(sweep.problems)} unreadable entries, e.g. {sweep.problems[0]})"
    return ""
