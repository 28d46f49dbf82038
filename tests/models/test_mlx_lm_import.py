"""Inference imports mlx-lm's models without its package's heavy __init__ (transformers),
and the package still works as usual for every other user in the process."""

import subprocess
import sys

SCRIPT = """
import sys
import lavit_mlx.understanding, lavit_mlx.generation
assert "transformers" not in sys.modules and "mlx_lm.utils" not in sys.modules, sorted(sys.modules)
import mlx_lm
assert callable(mlx_lm.load) and mlx_lm.__version__
from mlx_lm import generate, stream_generate
from mlx_lm.tuner.utils import linear_to_lora_layers
assert "transformers" in sys.modules  # the real __init__ ran on first use
print("ok")
"""


def test_inference_skips_mlx_lm_init_and_the_package_still_works():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_process_that_imported_mlx_lm_first_is_left_alone():
    proc = subprocess.run([sys.executable, "-c", "import mlx_lm, lavit_mlx.models.llm, sys;"
                           "print(type(sys.modules['mlx_lm'].load).__name__)"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "function", proc.stderr[-2000:]
