"""The pixel-decoding memory estimate (`lavit_mlx.memory`) and the sizes that used to crash.

The estimate is checked for what a user relies on: it grows with the image and the
batch, it bounds a measured run from above within 2x, an impossible size is refused
with one line that says what to change, and a size that crashed MLX (a failed
allocation is a segfault there) now runs in the memory the estimate promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from lavit_mlx.errors import LaVITError
from lavit_mlx.memory import (
    MemoryEstimate,
    available_memory,
    cgroup_available,
    check_pixel_memory,
    estimate_pixel_decoding,
)

MiB = 2**20

# An SD-1.5-shaped UNet and the SD VAE, narrowed (diffusers config keys).
SD_LIKE_UNET = dict(block_out_channels=[64, 128, 128, 128], layers_per_block=2, attention_head_dim=8,
                    cross_attention_dim=768,
                    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def read_config(official_checkpoint, folder: str) -> dict:
    return json.loads((official_checkpoint / folder / "config.json").read_text())


@pytest.fixture(scope="module")
def tiny_configs(official_checkpoint):
    return {
        "lowres": (read_config(official_checkpoint, "pixel_decoding/unet"),
                   read_config(official_checkpoint, "pixel_decoding/vae")),
        "highres": (read_config(official_checkpoint, "highres_pixel_decoding/unet"),
                    read_config(official_checkpoint, "highres_pixel_decoding/vae")),
        "sd_like": (SD_LIKE_UNET, SD_VAE),
    }


@pytest.mark.parametrize("name", ["lowres", "highres", "sd_like"])
def test_estimate_grows_with_size_and_batch(tiny_configs, name):
    unet, vae = tiny_configs[name]
    sizes = [64, 128, 256, 512, 1024, 2048]
    by_size = [estimate_pixel_decoding(unet, vae, s, s, 1, weight_bytes=10 * MiB, cpu=True) for s in sizes]
    for smaller, larger in zip(by_size, by_size[1:]):
        assert smaller.peak_bytes <= larger.peak_bytes
        assert smaller.denoise_bytes <= larger.denoise_bytes and smaller.vae_bytes <= larger.vae_bytes
    assert by_size[-1].peak_bytes > 4 * by_size[0].peak_bytes
    by_batch = [estimate_pixel_decoding(unet, vae, 512, 512, n, weight_bytes=10 * MiB, cpu=True) for n in (1, 2, 4)]
    for smaller, larger in zip(by_batch, by_batch[1:]):
        assert smaller.denoise_bytes < larger.denoise_bytes
    for estimate in by_size + by_batch:
        assert estimate.peak_bytes == max(estimate.denoise_bytes, estimate.vae_bytes)
        assert estimate.breakdown["weights"] == 10 * MiB


def test_estimate_takes_config_objects_and_wide_images(tiny_configs):
    from lavit_mlx.models.unet import UNetConfig
    from lavit_mlx.models.vae import VAEConfig

    unet, vae = tiny_configs["sd_like"]
    as_dicts = estimate_pixel_decoding(unet, vae, 768, 1344, 1, cpu=True)
    as_objects = estimate_pixel_decoding(UNetConfig.from_dict(unet), VAEConfig.from_dict(vae), 768, 1344, 1, cpu=True)
    assert as_dicts == as_objects
    transposed = estimate_pixel_decoding(unet, vae, 1344, 768, 1, cpu=True)
    assert 0.8 < transposed.peak_bytes / as_dicts.peak_bytes < 1.25


# ------------------------------------------------------------------------- measured runs
# A child process decodes with the official-tiny low-res decoder and reports its peak
# resident memory (VmHWM, reset at the baseline) above what it held before the pixel
# decoder loaded. Not ru_maxrss: the kernel carries the parent's peak across exec, so under
# a long pytest run it reported pytest's own resident memory (1.09 GB against 0.3). It can first cap
# its own address space (`ulimit -v`), where MLX's failed allocations used to segfault.
CHILD = textwrap.dedent("""
    import json, os, resource, sys
    import lavit_mlx
    import mlx.core as mx
    from lavit_mlx.errors import LaVITError

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    def peak_rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    def vm_size():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    checkpoint, size, steps, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    model = lavit_mlx.load(checkpoint, vision_heads=2)
    import lavit_convert.torch_io  # the released layout's pickle reader (torch), before the baseline
    import torch  # noqa: F401  (the pickle reader imports it lazily: its libraries are not decoding memory)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak (VmHWM) restarts here: loading's own peak is not decoding memory
    base = rss()
    mx.reset_peak_memory()
    decoder = model.pixel_decoder(False)
    mx.eval(decoder.unet.parameters(), decoder.vae.parameters())
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + limit, resource.RLIM_INFINITY))
    estimate = decoder.memory_estimate(size, size, 1)
    try:
        decoder.check_memory(size, size, 1)
    except LaVITError as error:
        print(json.dumps({"refused": str(error)}))
        sys.exit(0)
    context = mx.random.normal((1, 256, 768))
    latents = None
    for _, _, latents in decoder.denoise(context, size, size, steps=steps, seed=0):
        pass
    images = decoder.to_images(latents)
    peak = peak_rss()
    print(json.dumps({"shape": list(images.shape), "measured": peak - base, "estimate": estimate.peak_bytes,
                      "mlx_peak": mx.get_peak_memory(), "base": base, "threads": len(os.listdir("/proc/self/task"))}))
""")


def run_child(official_checkpoint, size: int, steps: int = 1, limit: int = 0) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(official_checkpoint), str(size), str(steps), str(limit)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_estimate_bounds_a_measured_run(official_checkpoint):
    result = run_child(official_checkpoint, 64, steps=2)
    assert result["shape"] == [1, 64, 64, 3]
    # MLX's own allocations and the whole process's growth are both bounded by the estimate.
    assert result["mlx_peak"] <= result["estimate"], result
    assert result["measured"] <= result["estimate"] <= 2 * result["measured"], result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ulimit -v and /proc")
def test_formerly_crashing_size_runs_within_an_address_limit(official_checkpoint):
    """112x112 on official-tiny: 3136 latent tokens, 8 heads, both guidance branches.
    One attention's scores are 630 MiB; computed whole (4x that in flight) they did not
    fit under this limit and MLX segfaulted on the failed allocation. Now they run in
    query chunks, and the estimate says so."""
    limit = 1536 * MiB
    result = run_child(official_checkpoint, 112, limit=limit)
    assert result["shape"] == [1, 112, 112, 3]
    assert result["estimate"] <= limit


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ulimit -v and /proc")
def test_size_that_cannot_fit_is_refused_not_crashed(official_checkpoint):
    result = run_child(official_checkpoint, 1024, limit=1536 * MiB)
    message = result["refused"]
    assert "\n" not in message
    assert "1024x1024" in message and "GiB" in message and "is available" in message
    for advice in ("--width/--height", "--ratio", "-n", "--low-memory", "--decoder lowres"):
        assert advice in message


# ------------------------------------------------------------------------- refusal, availability
def test_impossible_size_is_refused_in_one_line(tiny_configs):
    unet, vae = tiny_configs["sd_like"]
    estimate = estimate_pixel_decoding(unet, vae, 8192, 8192, 4, weight_bytes=3 * 2**30, cpu=True)
    with pytest.raises(LaVITError) as error:
        check_pixel_memory(estimate, available=8 * 2**30)
    message = str(error.value)
    assert "\n" not in message
    assert "4 images at 8192x8192" in message and "8.0 GiB is available" in message
    assert f"{estimate.peak_bytes / 2**30:.1f} GiB" in message
    check_pixel_memory(estimate, available=estimate.peak_bytes)  # exactly enough: no error
    with pytest.raises(LaVITError, match="more memory"):  # loaded weights are not counted twice
        check_pixel_memory(estimate, available=estimate.peak_bytes - 4 * 2**30, resident=3 * 2**30)
    check_pixel_memory(estimate, available=estimate.peak_bytes - 3 * 2**30, resident=3 * 2**30)


def test_available_memory_is_within_the_machine():
    import os

    available = available_memory()
    assert 0 < available <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ulimit -v")
def test_available_memory_respects_an_address_limit():
    code = ("import resource; from lavit_mlx.memory import available_memory; "
            "resource.setrlimit(resource.RLIMIT_AS, (2**31, resource.RLIM_INFINITY)); print(available_memory())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 2**31


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_limit_is_read(tmp_path, version):
    membership = tmp_path / "cgroup"
    if version == "v2":
        membership.write_text("0::/user.slice/job\n")
        group = tmp_path / "user.slice" / "job"
        group.mkdir(parents=True)
        (group / "memory.max").write_text(f"{6 * 2**30}\n")
        (group / "memory.current").write_text(f"{2**30}\n")
    else:
        membership.write_text("4:cpu,cpuacct:/job\n9:memory:/job\n")
        group = tmp_path / "memory" / "job"
        group.mkdir(parents=True)
        (group / "memory.limit_in_bytes").write_text(f"{6 * 2**30}\n")
        (group / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    assert cgroup_available(tmp_path, membership) == 5 * 2**30
    (group / ("memory.max" if version == "v2" else "memory.limit_in_bytes")).write_text(
        "max\n" if version == "v2" else "9223372036854771712\n")
    assert cgroup_available(tmp_path, membership) is None


def test_memory_estimate_describes_itself():
    estimate = MemoryEstimate(512, 512, 1, 3 * 2**30, 2**30, 3 * 2**30, {})
    assert estimate.describe() == "3.0 GiB (denoising 3.0 GiB, VAE decoding 1.0 GiB)"
