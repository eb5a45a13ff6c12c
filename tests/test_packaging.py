"""The repo's packages are the ones imported, and the README's quickstart runs."""
import os
import subprocess
import sys

import kernels
import nsa_module
import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_packages_resolve_inside_this_repository():
    # PyPI has other packages called `kernels` and `reference`; ours must shadow them
    for mod in (kernels, reference, nsa_module):
        assert os.path.abspath(mod.__file__).startswith(ROOT + os.sep), mod.__file__


def test_quickstart_cpu_path():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--cpu"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "all blocks selected vs full causal attention" in out.stdout
    err = float(out.stdout.split("all blocks selected vs full causal attention: max abs error ")[1].split()[0])
    assert err < 1e-5
