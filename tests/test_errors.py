"""How the command line shows errors and warnings meant for the user."""

from __future__ import annotations

import warnings

from domaingrad.data.base import DataWarning
from domaingrad.errors import DomainGradError, DomainGradWarning, report_error, show_warnings_plainly


def test_domaingrad_warnings_print_plainly_others_keep_pythons_format(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        show_warnings_plainly()
        warnings.warn("a single class", DataWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "domaingrad: warning: a single class\n" in err
    assert err.count("domaingrad: warning:") == 1 and "DataWarning" not in err  # the other one is not ours
    assert issubclass(DataWarning, DomainGradWarning)


def test_report_error_exit_codes(capsys):
    assert report_error(DomainGradError("bad --steps")) == 2
    assert capsys.readouterr().err == "domaingrad: error: bad --steps\n"
