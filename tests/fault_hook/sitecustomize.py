"""Start-up hook of the processes a fault test starts (``tests/fault_plugin.py``, fixture ``fault_spec``).

This folder is on ``PYTHONPATH`` only in those processes' environment, never in an install. With
``$VALUEGATE_TEST_FAULT`` set, it loads ``tests/fault_plugin.py`` and wraps the shard extraction of this
process with the fault (:func:`fault_plugin.patch_on_import`); without it, it does nothing.
"""

import os

if os.environ.get("VALUEGATE_TEST_FAULT"):
    import importlib.util
    import sys
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location("fault_plugin", Path(__file__).resolve().parent.parent
                                                   / "fault_plugin.py")
    _plugin = importlib.util.module_from_spec(_spec)
    sys.modules["fault_plugin"] = _plugin
    _spec.loader.exec_module(_plugin)
    _plugin.patch_on_import()
