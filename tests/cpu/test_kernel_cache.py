"""Long-running processes (a server, a training loop) must not grow: the compiled-kernel
cache stays at one entry per kernel and resident memory stays flat over many calls."""

from __future__ import annotations

import subprocess
import sys

CODE = r'''
import gc, sys
import lavit_mlx, mlx.core as mx
from lavit_mlx.cpu import kernels

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

model = lavit_mlx.load(sys.argv[1], vision_heads=2, components=["eva", "tokenizer"])
image = sys.argv[2]
for _ in range(10):  # warm up: every kernel compiled once, allocator pools filled
    model.tokenize([image])
gc.collect(); mx.clear_cache()
size, before = kernels.kernel_cache_size(), rss()
for _ in range(100):
    model.tokenize([image])
gc.collect(); mx.clear_cache()
print(size, kernels.kernel_cache_size(), before, rss())
'''


def test_100_tokenizations_keep_the_kernel_cache_and_memory_flat(official_tiny):
    out = subprocess.run([sys.executable, "-c", CODE, str(official_tiny / "checkpoint"), str(official_tiny / "input.png")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    size_before, size_after, rss_before, rss_after = map(int, out.stdout.split())
    assert size_after == size_before  # a kernel per function, never one per call
    assert rss_after - rss_before <= 16 * 2**20, (rss_before, rss_after)
