"""The production training path stands apart from the evaluation harness."""

from __future__ import annotations

import subprocess
import sys


def test_the_training_job_does_not_import_the_harness():
    code = (
        "import sys, training.pipeline, training.initialisation, training.learners\n"
        "lab = sorted(m for m in ('training.harness', 'training.methods', 'training.report', 'training.topn') if m in sys.modules)\n"
        "print(','.join(lab))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the production path imports {out.stdout.strip()}"
