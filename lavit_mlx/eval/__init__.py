"""Model-independent parts of `lavit eval`: metrics, dataset readers, reports.

Submodules (each imports without mlx or torch; optional extras are imported when used):

- `caption_metrics`: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D with coco-caption (`[eval]`).
- `vqa_metrics`: VQAv2 accuracy with the official answer normalisation.
- `data`: readers for JSONL manifests, COCO caption files, the Karpathy split, VQAv2.
- `token_stats`: visual token counts, keep fraction vs rho, codebook usage (`[plot]`).
- `fid`: FID with torchmetrics and torch-fidelity's Inception (`[fid]`).
- `report`: the JSON report every eval writes, and a plain-text table.
"""
