"""Process-wide GC settings of the switch and its journal writer (switch.runtime)."""
from __future__ import annotations

import subprocess
import sys


def test_tune_gc_freezes_start_up_objects_and_keeps_collecting_cycles():
    # in a child: the settings are process-wide and must not leak into the test run
    code = """
import gc
from switch.runtime import tune_gc
tune_gc()
frozen = gc.get_freeze_count()
class Node: pass
a, b = Node(), Node(); a.other, b.other = b, a
del a, b
print(gc.get_threshold()[0], frozen > 1000, gc.collect() >= 2)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["20000", "True", "True"]
