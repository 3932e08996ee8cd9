"""Each integration is an optional extra: ``import autobatch`` never loads its framework, and
importing the integration without the framework fails with one line naming the pip command."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

EXTRAS = [
    # (integration, the framework's modules, the extra)
    ("lightning", ("lightning", "lightning.pytorch"), "lightning"),
    ("transformers", ("transformers",), "transformers"),
    ("sklearn", ("skorch",), "sklearn"),
]


@pytest.mark.parametrize(("integration", "modules", "extra"), EXTRAS)
def test_core_never_imports_the_framework_and_a_missing_one_is_one_line(
    integration, modules, extra, monkeypatch
):
    framework = modules[0]
    code = (
        "import sys, autobatch; autobatch.probe; autobatch.tune; "
        f"print({framework!r} in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

    monkeypatch.delitem(sys.modules, f"autobatch.integrations.{integration}", raising=False)
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"pip install 'torch-autobatch\[{extra}\]'") as info:
        importlib.import_module(f"autobatch.integrations.{integration}")
    assert info.value.__cause__ is None and info.value.__suppress_context__
