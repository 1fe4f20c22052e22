import subprocess
import sys


def test_core_modules_import_without_prefect():
    code = (
        "import sys, importlib, pkgutil, metamerge\n"
        "for m in pkgutil.iter_modules(metamerge.__path__):\n"
        "    importlib.import_module('metamerge.' + m.name)\n"
        "bad = sorted(k for k in sys.modules if k == 'prefect' or k.startswith('prefect.'))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout
