"""The memory table of docs/training-cluster.md comes from the release's configs."""

from __future__ import annotations

from lavit_train import memory


def test_parameter_counts_are_the_releases_and_fsdp2_shards_them():
    sizes = memory.component_sizes()
    assert round(sizes["eva"][0] / 1e9, 2) == 1.01  # EVA-CLIP ViT-g/14
    assert round(sizes["tokenizer"][0] / 1e6) == 404  # tokenizer_encoder.bin: 808 MB of fp16
    assert round(sizes["llm"][0] / 1e9, 2) == 6.87  # LLaMA-2-7B with the 48386-id vocabulary
    assert round(sizes["unet"][0] / 1e9, 2) == 2.57  # SDXL's UNet
    for stage in ("tokenizer", "llm", "pixel"):
        ddp, fsdp8, fsdp64 = (memory.estimate(stage, s, g, sizes) for s, g in (("ddp", 8), ("fsdp", 8), ("fsdp", 64)))
        assert fsdp64.total < fsdp8.total < ddp.total
        assert ddp.micro_batch * ddp.accumulation * 8 == memory.GLOBAL_BATCH[stage]
    assert memory.estimate("llm", "ddp", 8, sizes).total > 80  # a 7B LLM does not train under DDP on 80 GB
    assert memory.estimate("llm", "fsdp", 64, sizes).total < 40
