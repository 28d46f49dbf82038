"""Statistics of LaVIT's dynamic visual tokens over an image set.

The token selector keeps a variable number of the encoder's patches per image (paper
section 3.1: the keep-ratio loss pulls the mean kept fraction towards rho = 1/3 of the
256 patches), and the quantizer maps each kept token to one of 16384 codes. This module
summarises per-image counts (mean, median, percentiles, kept fraction vs rho) and code
usage (perplexity = exp(entropy) of the code histogram, share of the codebook ever used),
overall and split by label columns (e.g. num_objects), and draws a histogram of the counts
(matplotlib, extra `[plot]`).
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import LaVITError, MissingDependencyError
from .report import write_atomic

PERCENTILES = (5, 25, 75, 95)
PLOT_HINT = "the token histogram needs matplotlib: pip install 'lavit-mlx[plot]'"


def count_summary(num_tokens: Sequence[int], num_patches: int = 256, rho: float = 1 / 3) -> Dict[str, float]:
    """Summary of per-image token counts.

    Args:
        num_tokens: kept tokens per image.
        num_patches: patches the selector chooses from (256 for a 224 px, patch-14 ViT).
        rho: the configured target keep ratio.

    Returns:
        {"images", "mean", "median", "p5", "p25", "p75", "p95", "min", "max",
         "kept_fraction" (mean count / num_patches), "rho", "kept_minus_rho"}.
    """
    counts = np.asarray(num_tokens, dtype=np.float64)
    if counts.size == 0:
        raise LaVITError("no token counts to summarise")
    summary = {"images": int(counts.size), "mean": float(counts.mean()), "median": float(np.median(counts))}
    for percent, value in zip(PERCENTILES, np.percentile(counts, PERCENTILES)):
        summary[f"p{percent}"] = float(value)
    kept = float(counts.mean()) / num_patches
    summary.update({"min": int(counts.min()), "max": int(counts.max()), "kept_fraction": kept,
                    "rho": float(rho), "kept_minus_rho": kept - float(rho)})
    return summary


def codebook_usage(codes: Iterable[Sequence[int]], codebook_size: int = 16384) -> Dict[str, float]:
    """How the codebook is used by a set of images' codes.

    Args:
        codes: the code ids of each image.
        codebook_size: number of codebook entries.

    Returns:
        {"tokens": total codes, "codes_used": distinct codes, "usage": codes_used /
         codebook_size, "perplexity": exp(entropy) of the code histogram (natural log;
         equals codes_used when all are equally frequent)}.
    """
    histogram: Counter = Counter()
    for image_codes in codes:
        histogram.update(int(code) for code in image_codes)
    total = sum(histogram.values())
    if total == 0:
        return {"tokens": 0, "codes_used": 0, "usage": 0.0, "perplexity": 0.0}
    probabilities = np.array(list(histogram.values()), dtype=np.float64) / total
    entropy = float(-(probabilities * np.log(probabilities)).sum())
    return {"tokens": int(total), "codes_used": len(histogram), "usage": len(histogram) / codebook_size,
            "perplexity": float(np.exp(entropy))}


def _check_inputs(num_tokens: Sequence[int], codes: Optional[Sequence[Sequence[int]]],
                  labels: Mapping[str, Sequence[Any]], num_patches: int, codebook_size: int) -> None:
    for index, count in enumerate(num_tokens):
        if isinstance(count, bool) or int(count) != count or not 0 <= count <= num_patches:
            raise LaVITError(f"image {index}: token count {count!r} is not an integer in 0..{num_patches}")
    if codes is not None:
        if len(codes) != len(num_tokens):
            raise LaVITError(f"{len(codes)} code lists for {len(num_tokens)} token counts")
        for index, (count, image_codes) in enumerate(zip(num_tokens, codes)):
            if len(image_codes) != count:
                raise LaVITError(f"image {index}: {len(image_codes)} codes for {count} tokens")
            bad = [code for code in image_codes if not 0 <= int(code) < codebook_size]
            if bad:
                raise LaVITError(f"image {index}: code {bad[0]} is outside the codebook (0..{codebook_size - 1})")
    for name, values in labels.items():
        if len(values) != len(num_tokens):
            raise LaVITError(f"label column {name!r} has {len(values)} values for {len(num_tokens)} images")


def _group_stats(indices: Sequence[int], num_tokens: Sequence[int], codes: Optional[Sequence[Sequence[int]]],
                 num_patches: int, rho: float, codebook_size: int) -> Dict[str, Any]:
    stats: Dict[str, Any] = count_summary([num_tokens[i] for i in indices], num_patches, rho)
    if codes is not None:
        stats["codebook"] = codebook_usage((codes[i] for i in indices), codebook_size)
    return stats


def save_histogram(num_tokens: Sequence[int], path: Union[str, Path], num_patches: int = 256,
                   rho: Optional[float] = None, groups: Optional[Sequence[Any]] = None,
                   title: Optional[str] = None, force: bool = False) -> Path:
    """Draw a histogram of token counts to a PNG file (written atomically).

    Args:
        num_tokens: kept tokens per image.
        path: the .png to write.
        num_patches: the x axis runs from 0 to it.
        rho: draw the target count rho * num_patches as a vertical line.
        groups: one label value per image: one overlaid histogram per value.
        title: the plot's title.
        force: replace an existing file.

    Raises:
        MissingDependencyError: matplotlib is not installed (one line saying what to install).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(PLOT_HINT) from None
    width = max(1, int(np.ceil((num_patches + 1) / 64)))  # at most ~64 bars
    bins = np.arange(0, num_patches + width + 1, width) - 0.5
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    if groups is None:
        axes.hist(num_tokens, bins=bins, color="tab:blue")
    else:
        by_value: Dict[Any, List[int]] = defaultdict(list)
        for value, count in zip(groups, num_tokens):
            by_value[value].append(count)
        for value in sorted(by_value, key=lambda value: _label_order(str(value))):
            axes.hist(by_value[value], bins=bins, alpha=0.5, label=str(value))
    if rho is not None:
        axes.axvline(rho * num_patches, color="black", linestyle="--", linewidth=1,
                     label=f"rho x {num_patches} = {rho * num_patches:.0f}")
    if groups is not None or rho is not None:
        axes.legend(fontsize="small")
    axes.set_xlim(-0.5, num_patches + 0.5)
    axes.set_xlabel("visual tokens per image")
    axes.set_ylabel("images")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_atomic(path, buffer.getvalue(), force=force)


def token_stats(num_tokens: Sequence[int], codes: Optional[Sequence[Sequence[int]]] = None,
                labels: Optional[Mapping[str, Sequence[Any]]] = None, num_patches: int = 256,
                rho: float = 1 / 3, codebook_size: int = 16384,
                histogram: Optional[Union[str, Path]] = None, force: bool = False) -> Dict[str, Any]:
    """Token statistics of an image set, overall and per label value.

    Args:
        num_tokens: kept tokens per image.
        codes: each image's code ids (same order), for codebook usage; optional.
        labels: {column: one value per image} (e.g. {"num_objects": [...]}); optional.
        num_patches: patches the selector chooses from.
        rho: the configured target keep ratio.
        codebook_size: number of codebook entries.
        histogram: a .png path for the histogram of counts; optional.
        force: replace an existing histogram file.

    Returns:
        {"all": stats, "by_label": {column: {value: stats}}, "histogram": path or None,
         and "histogram_error": a one-line message when it could not be drawn}; stats as
        in `count_summary`, plus "codebook" (`codebook_usage`) when codes are given.
    """
    labels = dict(labels or {})
    _check_inputs(num_tokens, codes, labels, num_patches, codebook_size)
    everyone = list(range(len(num_tokens)))
    report: Dict[str, Any] = {"all": _group_stats(everyone, num_tokens, codes, num_patches, rho, codebook_size),
                              "by_label": {}}
    for name, values in labels.items():
        members: Dict[str, List[int]] = defaultdict(list)
        for index, value in enumerate(values):
            members[str(value)].append(index)
        report["by_label"][name] = {value: _group_stats(indices, num_tokens, codes, num_patches, rho, codebook_size)
                                    for value, indices in sorted(members.items(), key=lambda item: _label_order(item[0]))}
    report["histogram"] = None
    if histogram is not None:
        try:
            report["histogram"] = str(save_histogram(num_tokens, histogram, num_patches, rho, force=force))
        except (MissingDependencyError, LaVITError) as exc:
            report["histogram_error"] = str(exc)
    return report


def _label_order(value: str):
    """Numbers in numeric order (2 before 10), then the rest alphabetically."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)
