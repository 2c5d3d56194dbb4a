"""The Python example of docs/analysis.md runs as written and measures what it says."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "analysis.md"


def test_analysis_docs_python_example_runs():
    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, str(DOC), "exec"), namespace)
    sim = namespace["sim"]
    assert -1.0 <= sim.network.inter <= 1.0 and -1.0 <= sim.network.intra <= 1.0
    # the Monte Carlo check of eq. (9) does not reject at the 1% level for either n
    assert [check.n for check in namespace["law"]] == [10, 100]
    assert all(check.ks_pvalue > 0.01 for check in namespace["law"])
    # one gradient tensor per parameter, each (D, *shape) with D = 3 domains
    model = namespace["model"]
    assert [g.shape for g in namespace["draw"]] == [(3, *p.shape) for p in model.parameters()]
    distance = re.search(r"variance distance (\S+)", printed.getvalue())
    assert distance is not None and math.isfinite(float(distance.group(1))) and float(distance.group(1)) > 0
    assert "layer PCGrad modification ratio" in printed.getvalue()
    assert isinstance(namespace["grads"][0], torch.Tensor)
