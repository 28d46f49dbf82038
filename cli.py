"""The `lavit` command: thin typer commands over the `lavit_mlx` library.

Each command parses its options, resolves paths, calls one library function and prints.
Errors a user can fix are printed as one line (`error: ...`), never as a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="lavit",
    help="LaVIT on MLX: tokenize, understand and generate images.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

MODEL_ENV = "LAVIT_MODEL"

ModelOption = typer.Option(
    None, "--model", "-m",
    help=f"LaVIT checkpoint folder (released layout). Default: ${MODEL_ENV}.",
    show_default=False,
)
VisionHeadsOption = typer.Option(
    None, "--vision-heads", min=1,
    help="Attention heads of the ViT, merger and VQ decoders (release: 16; shapes cannot tell).",
)


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=_stderr(), transient=True,
    )


QuantizeOption = typer.Option(None, "--quantize", help="Quantize the LLM to 4 or 8 bits when loading (group size 64).")


def _spinner(text: str):
    return _stderr().status(text)


def _open_model(model: Optional[Path], vision_heads: Optional[int], quantize: Optional[int] = None):
    from lavit_mlx import load
    from lavit_mlx.errors import LaVITError

    path = model or (Path(os.environ[MODEL_ENV]) if os.environ.get(MODEL_ENV) else None)
    if path is None:
        raise LaVITError(f"no model given: pass --model DIR or set {MODEL_ENV}")
    lavit = load(path, vision_heads=vision_heads, quantize=quantize)
    _stderr().print(f"model: {lavit.checkpoint.describe()}", highlight=False)
    if quantize:
        with _spinner(f"loading the LLM ({quantize}-bit)"):
            report = lavit.llm.quantization
        if report is not None:
            _stderr().print(f"LLM quantized {report.describe()}", highlight=False)
    return lavit


def _version_callback(value: bool):
    if value:
        from lavit_mlx import __version__

        typer.echo(f"lavit-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
):
    """LaVIT on MLX: tokenize, understand and generate images."""


@app.command()
def info(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Also describe this checkpoint folder."),
    vision_heads: Optional[int] = VisionHeadsOption,
    verify: bool = typer.Option(False, "--verify", help="Check the MLX folder's files against its manifest checksums."),
):
    """Print versions, the MLX device and which BLAS MLX uses."""
    from lavit_mlx.cpu.runtime import describe_runtime

    report, warnings = describe_runtime()
    for key, value in report.items():
        typer.echo(f"{key:<12} {value}")
    if model is not None:
        lavit = _open_model(model, vision_heads)
        for key, value in lavit.describe().items():
            typer.echo(f"{key:<12} {value}")
        if verify:
            from lavit_mlx.errors import LaVITError

            if lavit.checkpoint.kind != "mlx":
                raise LaVITError("--verify needs an MLX folder (the released layout has no manifest)")
            problems = list(lavit.checkpoint.verify())
            if problems:
                raise LaVITError(f"{len(problems)} file(s) differ from the manifest, first: {problems[0][0]} ({problems[0][1]})")
            typer.echo("manifest     all files match their checksums")
    for warning in warnings:
        _stderr().print(f"[yellow]warning:[/] {warning}", highlight=False)


@app.command()
def tokenize(
    images: List[Path] = typer.Argument(..., help="Image files (any format PIL reads)."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    sample: bool = typer.Option(
        False, "--sample", help="Sample the token selection (Gumbel, as the official inference) instead of the deterministic rule."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for --sample (default: random, printed)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {image, num_tokens, codes}."),
):
    """Turn images into LaVIT's dynamic discrete visual tokens."""
    lavit = _open_model(model, vision_heads)
    if sample and seed is None:
        import random

        seed = random.randrange(2**31)
        _stderr().print(f"sampling with --seed {seed}", highlight=False)
    with _progress() as progress:
        task = progress.add_task("tokenizing", total=len(images))
        results = lavit.tokenize(
            [str(p) for p in images], sample=sample, seed=seed, batch_size=batch_size,
            progress=lambda n: progress.advance(task, n),
        )
    if as_json:
        payload = [
            {"image": r.source, "num_tokens": r.num_tokens, "codes": r.codes.tolist()} for r in results
        ]
        typer.echo(json.dumps(payload))
        return
    for r in results:
        typer.echo(f"{r.source}: {r.num_tokens} tokens")
        typer.echo(" ".join(str(c) for c in r.codes.tolist()))


def _print_answers(answers, as_json: bool, key: str):
    if as_json:
        typer.echo(json.dumps([{"image": a.source, key: a.text} for a in answers]))
        return
    for answer in answers:
        typer.echo(f"{answer.source}: {answer.text}")


@app.command()
def caption(
    images: List[Path] = typer.Argument(..., help="Image files."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    quantize: Optional[int] = QuantizeOption,
    prompt: str = typer.Option("", "--prompt", help="Text after the image (the release captions with none)."),
    beams: int = typer.Option(2, "--beams", min=1, help="Beam search width (1: greedy or --sample)."),
    max_tokens: int = typer.Option(36, "--max-tokens", min=1, help="Most new tokens."),
    min_tokens: int = typer.Option(8, "--min-tokens", min=0, help="Fewest new tokens."),
    sample: bool = typer.Option(False, "--sample", help="Sample the words (needs --beams 1)."),
    sample_tokens: bool = typer.Option(False, "--sample-tokens", help="Sample the visual token selection, as the release does."),
    seed: int = typer.Option(0, "--seed", help="Seed for --sample and --sample-tokens."),
    as_json: bool = typer.Option(False, "--json", help='Print a JSON list of {"image", "caption"}.'),
):
    """Caption images (the release's settings: 2 beams, 8..36 tokens, cut at the first '.')."""
    from lavit_mlx.understanding import caption as run

    lavit = _open_model(model, vision_heads, quantize)
    with _spinner("captioning"):
        answers = run(lavit, [str(p) for p in images], prompt, num_beams=beams, max_new_tokens=max_tokens,
                      min_new_tokens=min_tokens, do_sample=sample, sample_tokens=sample_tokens, seed=seed)
    _print_answers(answers, as_json, "caption")


@app.command()
def ask(
    image: Path = typer.Argument(..., help="Image file."),
    question: str = typer.Argument(..., help="The question."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    quantize: Optional[int] = QuantizeOption,
    beams: int = typer.Option(5, "--beams", min=1, help="Beam search width."),
    max_tokens: int = typer.Option(10, "--max-tokens", min=1, help="Most new tokens."),
    min_tokens: int = typer.Option(2, "--min-tokens", min=0, help="Fewest new tokens."),
    sample_tokens: bool = typer.Option(False, "--sample-tokens", help="Sample the visual token selection, as the release does."),
    seed: int = typer.Option(0, "--seed", help="Seed for --sample-tokens."),
    as_json: bool = typer.Option(False, "--json", help='Print a JSON list of {"image", "answer"}.'),
):
    """Answer a question about an image ("Question: {} Answer:", 5 beams, 2..10 tokens)."""
    from lavit_mlx.understanding import ask as run

    lavit = _open_model(model, vision_heads, quantize)
    with _spinner("answering"):
        answers = run(lavit, [str(image)], question, num_beams=beams, max_new_tokens=max_tokens,
                      min_new_tokens=min_tokens, sample_tokens=sample_tokens, seed=seed)
    _print_answers(answers, as_json, "answer")


def _run_pipeline(stages, settings, out: Path, force: bool):
    """Drive a generation generator with progress bars and save the images."""
    from lavit_mlx.generation import Event, check_outputs, output_paths, save_png

    paths = output_paths(out, settings.num_images)
    check_outputs(paths, force)
    labels = {"tokens": "image tokens (LLM)", "decode": "VQ decoder", "denoise": "denoising (UNet)", "vae": "VAE decode"}
    images = None
    with _progress() as progress:
        tasks = {}
        for event in stages:
            if not isinstance(event, Event):
                images = event
                break
            if event.stage not in tasks:
                tasks[event.stage] = progress.add_task(labels[event.stage], total=event.total)
            progress.update(tasks[event.stage], completed=event.done, total=event.total)
    for index, (image, path) in enumerate(zip(images, paths)):
        save_png(image, path, settings, index)
        typer.echo(str(path))


def _settings(**values):
    from lavit_mlx.generation import GenerationSettings

    return GenerationSettings(**values).resolved()


@app.command()
def generate(
    prompt: str = typer.Option("", "--prompt", "-p", help="Text; '<image>' marks where each --image goes."),
    image: List[Path] = typer.Option([], "--image", help="Prompt image (repeatable). Without a <image> mark it comes first."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    quantize: Optional[int] = QuantizeOption,
    out: Path = typer.Option(Path("lavit.png"), "--out", "-o", help="Output PNG (-n > 1: NAME-1.png, NAME-2.png, ...)."),
    n: int = typer.Option(1, "-n", min=1, help="Number of images."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (default: random; stored in the PNG)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Text the LLM guidance steers away from."),
    decoder: str = typer.Option("highres", "--decoder", help="Pixel decoder: highres (SDXL-shaped, default) or lowres (512px)."),
    ratio: Optional[str] = typer.Option(None, "--ratio", help="High-res aspect ratio: 1:1, 4:3, 3:2, 16:9, 2:3, 3:4."),
    width: Optional[int] = typer.Option(None, "--width", help="Width in pixels (multiple of 8)."),
    height: Optional[int] = typer.Option(None, "--height", help="Height in pixels (multiple of 8)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Denoising steps (release: 25 highres, 50 lowres)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="UNet guidance (release: 7.0 highres, 5.0 lowres)."),
    llm_guidance: Optional[float] = typer.Option(None, "--llm-guidance", help="LLM guidance (release: 4.0, 5.0 with an image)."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim (the release), euler or dpm++2m."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Free the LLM before the UNet runs."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
):
    """Generate images from text or text + image prompts."""
    from lavit_mlx.generation import generate_stages

    settings = _settings(prompt=prompt, images=[str(p) for p in image], negative_prompt=negative_prompt,
                         seed=seed, num_images=n, decoder=decoder, ratio=ratio, width=width, height=height,
                         steps=steps, guidance=guidance, llm_guidance=llm_guidance, scheduler=scheduler,
                         low_memory=low_memory)
    lavit = _open_model(model, vision_heads, quantize)
    _run_pipeline(generate_stages(lavit, settings), settings, out, force)


@app.command()
def reconstruct(
    image: Path = typer.Argument(..., help="Image to tokenize and decode again."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    out: Path = typer.Option(Path("reconstruction.png"), "--out", "-o", help="Output PNG."),
    n: int = typer.Option(1, "-n", min=1, help="Number of images."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (default: random; stored in the PNG)."),
    decoder: str = typer.Option("highres", "--decoder", help="highres or lowres."),
    ratio: Optional[str] = typer.Option(None, "--ratio", help="High-res aspect ratio."),
    width: Optional[int] = typer.Option(None, "--width", help="Width in pixels."),
    height: Optional[int] = typer.Option(None, "--height", help="Height in pixels."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Denoising steps."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="UNet guidance."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim, euler or dpm++2m."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
):
    """Reconstruct an image from its own visual tokens (shows what the tokenizer keeps)."""
    from lavit_mlx.generation import reconstruct_stages

    settings = _settings(prompt="", images=[str(image)], seed=seed, num_images=n, decoder=decoder, ratio=ratio,
                         width=width, height=height, steps=steps, guidance=guidance, scheduler=scheduler)
    lavit = _open_model(model, vision_heads)
    _run_pipeline(reconstruct_stages(lavit, str(image), settings), settings, out, force)


@app.command()
def convert(
    src: str = typer.Argument(..., help="A released-layout folder, a lavit_train checkpoint, a Hugging Face repo id "
                              "(e.g. rain1011/LaVIT-7B-v2), or (with --to torch) an MLX folder."),
    out: Path = typer.Argument(..., help="Output folder (written atomically)."),
    to: str = typer.Option("mlx", "--to", help="Target format: mlx or torch."),
    dtype: str = typer.Option("float16", "--dtype", help="Weight dtype: float16, bfloat16 or float32."),
    quantize: Optional[int] = typer.Option(None, "--quantize", help="Quantize the LLM to 4 or 8 bits."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size (32, 64 or 128)."),
    quantize_vision: bool = typer.Option(False, "--quantize-vision", help="Also quantize the vision components to 8 bits."),
    quantize_unet: bool = typer.Option(False, "--quantize-unet", help="Also quantize the UNets' linear layers to 8 bits."),
    components: Optional[str] = typer.Option(
        None, "--components",
        help="Comma-separated subset: eva, tokenizer, understanding, lowres_decoder, highres_decoder, llm, "
             "highres_pixel, lowres_pixel (default: all the source has). Text-to-image needs llm, "
             "highres_decoder, highres_pixel.",
    ),
    vision_heads: Optional[int] = VisionHeadsOption,
    safetensors: bool = typer.Option(False, "--safetensors", help="With --to torch: write the LLM as safetensors instead of .bin."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only once the new one is complete)."),
):
    """Convert a LaVIT checkpoint to the MLX folder format (or back to PyTorch)."""
    from lavit_mlx.errors import LaVITError

    progress_line = lambda name: _stderr().print(f"converting {name}", highlight=False)  # noqa: E731
    if to == "torch":
        from lavit_convert.to_torch import convert_to_torch

        written = convert_to_torch(src, out, force=force, safetensors=safetensors, progress=progress_line)
        typer.echo(f"wrote {out} (released PyTorch layout): {', '.join(written)}")
        return
    if to != "mlx":
        raise LaVITError(f"--to {to!r}: expected mlx or torch")
    from lavit_convert.hub import resolve_source
    from lavit_convert.to_mlx import ALL_COMPONENTS, ConvertOptions, convert_to_mlx

    chosen = [c.strip() for c in components.split(",") if c.strip()] if components else None
    unknown = [c for c in chosen or [] if c not in ALL_COMPONENTS]
    if unknown:
        raise LaVITError(f"--components: unknown component {unknown[0]!r}; choose from {', '.join(ALL_COMPONENTS)}")
    source = resolve_source(src, chosen or list(ALL_COMPONENTS))
    options = ConvertOptions(components=chosen, dtype=dtype, quantize=quantize, group_size=group_size,
                             quantize_vision=quantize_vision, quantize_unet=quantize_unet,
                             vision_heads=vision_heads, force=force)
    report = convert_to_mlx(source, out, options, progress=progress_line)
    typer.echo(f"wrote {out} (MLX folder, {report.bytes_written / 2**30:.2f} GiB): {', '.join(report.components)}")
    for component, layers in report.unquantized.items():
        typer.echo(f"left unquantized in {component} (width not divisible by {group_size}): {', '.join(layers)}")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `lavit` console script."""
    import lavit_mlx  # noqa: F401  (loads the fast BLAS before anything imports mlx)
    from lavit_mlx.errors import LaVITError

    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="lavit", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except typer.Abort:
        typer.echo("error: interrupted", err=True)
        code = 130
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.TyperException as exc:  # click's usage errors (bad flag, missing argument)
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `lavit`: show the help
            typer.echo(exc.format_message())
            sys.exit(0)
        code = getattr(exc, "exit_code", 2)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None and code == 2 else ""
        typer.echo(f"error: {message}{hint}", err=True)
    except LaVITError as exc:
        typer.echo(f"error: {exc}", err=True)
        code = 1
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        code = 130
    except MemoryError:
        typer.echo("error: out of memory; try a smaller --batch-size or a quantized model", err=True)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
