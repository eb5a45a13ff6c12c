"""The repo's packages are the ones imported, the README's install line is CI's, and the README's
quickstart runs and says where its kernels came from."""
import importlib.util
import os
import shlex
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
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "all blocks selected vs full causal attention" in out.stdout
    err = float(out.stdout.split("all blocks selected vs full causal attention: max abs error ")[1].split()[0])
    assert err < 1e-5


def test_readme_cpu_torch_line_is_the_one_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    line = next(x for x in readme.splitlines() if x.startswith("pip install torch") and "cpu" in x)
    args = shlex.split(line.split("#")[0])[2:]  # after `pip install`: the requirement and the index
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert any(shlex.split(x)[-len(args):] == args for x in ci.splitlines() if "pip install" in x), line
    assert readme.index(line) < readme.index('pip install -e ".[test]" && python examples/quickstart.py')


def test_quickstart_says_compiled_or_cached(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))  # its _cpu helper
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(ROOT, "examples", "quickstart.py"))
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    before = quickstart.cache_files()
    assert quickstart.compiled_or_cached(before, 0.8).startswith("loaded from TileLang's cache")
    (tmp_path / "kernels" / "abc").mkdir(parents=True)
    (tmp_path / "kernels" / "abc" / "kernel.cubin").write_bytes(b"\0")
    assert quickstart.compiled_or_cached(before, 41.0).startswith("compiled in 41.0 s and stored")
