"""The `lavit` command: thin typer commands over the `lavit_mlx` library.

Each command checks its options and paths first (before any model is loaded), then
calls one library function and prints. Errors a user can fix are printed as one line
(`error: ...`), never as a traceback. Progress goes to stderr: bars in a terminal, one
plain line per stage otherwise; results go to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Literal, Optional

import click
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
Decoder = Literal["highres", "lowres"]
Scheduler = Literal["ddim", "euler", "dpm++2m"]
Ratio = Literal["1:1", "4:3", "3:2", "16:9", "2:3", "3:4"]
Bits = Literal["4", "8"]

ModelOption = typer.Option(
    None, "--model", "-m",
    help=f"LaVIT checkpoint: an MLX folder (lavit convert) or the released layout. Default: ${MODEL_ENV}, "
         "else the bundled shapes-world model.",
    show_default=False,
)
VisionHeadsOption = typer.Option(
    None, "--vision-heads", min=1, show_default=False,
    help="Attention heads of the ViT, merger and VQ decoders. Default: stored in an MLX folder; 16 for the "
         "release's widths (1408); required for other widths (shapes cannot tell).",
)
QuantizeOption = typer.Option(
    None, "--quantize", show_default=False,
    help="Quantize the LLM to 4 or 8 bits when loading (group size 64). Default: as stored.",
)


ForceOption = typer.Option(False, "--force", help="Overwrite existing output files.")


AdapterOption = typer.Option(None, "--adapter", show_default=False,
                             help="A LoRA adapter folder (lavit finetune) applied to the LLM as it loads.")


def _seed_option(what: str):
    return typer.Option(None, "--seed", min=0, max=2**32 - 1, show_default=False,
                        help=f"Seed for {what}, 0..4294967295. Default: random, printed.")


# ------------------------------------------------------------------------- output
def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _note(text: str) -> None:
    _stderr().print(text, markup=False, soft_wrap=True)  # one line, whatever the width (paths, logs)


class Reporter:
    """Progress of long work: rich bars in a terminal; elsewhere (logs, CI, pipes) one
    plain line per finished stage."""

    def __init__(self, labels: dict):
        self.labels = labels
        self.interactive = sys.stderr.isatty()
        self.started: dict = {}
        self.finished: set = set()
        self.tasks: dict = {}
        self.progress = None

    def __enter__(self):
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=_stderr(), transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, stage: str, done: int, total: int) -> None:
        label = self.labels.get(stage, stage)
        if stage not in self.started:
            self.started[stage] = time.perf_counter()
            if self.progress is not None:
                self.tasks[stage] = self.progress.add_task(label, total=total)
        if self.progress is not None:
            self.progress.update(self.tasks[stage], completed=done, total=total)
        if done >= total and stage not in self.finished:
            self.finished.add(stage)
            if not self.interactive:
                _note(f"{label}: {done}/{total} in {time.perf_counter() - self.started[stage]:.1f} s")


# ------------------------------------------------------------------------- model
def _model_path(model: Optional[Path]) -> Path:
    from lavit_mlx.zoo import bundled_model

    path = model or (Path(os.environ[MODEL_ENV]) if os.environ.get(MODEL_ENV) else None)
    return path if path is not None else bundled_model()


def _open_model(model: Optional[Path], vision_heads: Optional[int], quantize: Optional[str] = None,
                adapter: Optional[Path] = None):
    from lavit_mlx import load

    bits = int(quantize) if quantize else None
    lavit = load(_model_path(model), vision_heads=vision_heads, quantize=bits, adapter=adapter)
    from lavit_mlx.zoo import BUNDLED_NAME, is_bundled

    named = f"{BUNDLED_NAME} (bundled) " if is_bundled(lavit.checkpoint.path) else ""
    _note(f"model: {named}{lavit.checkpoint.describe()}" + (f", adapter {adapter}" if adapter else ""))
    if bits:
        with _stderr().status(f"loading the LLM ({bits}-bit)"):
            report = lavit.llm.quantization
        if report is not None:
            _note(f"LLM quantized {report.describe()}")
    return lavit


def _input_problem(path) -> Optional[str]:
    if not Path(path).exists():
        return f"{path}: no such file"
    if Path(path).is_dir():
        return f"{path}: is a folder, not an image"
    return None


def _check_inputs(paths, all_needed: bool = True) -> None:
    """Fail before loading a model when input files are plainly missing: any of them when
    each is needed, or all of them for commands that report bad inputs one by one."""
    from lavit_mlx.errors import ImageError

    problems = [p for p in map(_input_problem, paths) if p]
    if problems and (all_needed or len(problems) == len(paths)):
        raise ImageError(problems[0])


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


# ------------------------------------------------------------------------- info
@app.command()
def info(
    model: Optional[Path] = typer.Option(None, "--model", "-m", show_default=False,
                                         help="Also describe this checkpoint folder."),
    vision_heads: Optional[int] = VisionHeadsOption,
    verify: bool = typer.Option(False, "--verify", help="Check the MLX folder's files against its manifest checksums."),
):
    """Print versions, the device, the BLAS MLX uses (with a measured GFLOP/s) and a model's contents."""
    from lavit_mlx.cpu.runtime import describe_runtime
    from lavit_mlx.errors import LaVITError

    from lavit_mlx.zoo import BUNDLED_MODEL, model_name

    report, warnings = describe_runtime()
    for key, value in report.items():
        typer.echo(f"{key:<12} {value}")
    default = Path(os.environ[MODEL_ENV]) if os.environ.get(MODEL_ENV) else BUNDLED_MODEL
    typer.echo(f"{'default':<12} {model_name(default)}" + ("" if (default / "config.json").exists()
                                                            or default != BUNDLED_MODEL else " [missing]"))
    if model is not None:
        lavit = _open_model(model, vision_heads)
        for key, value in lavit.describe().items():
            typer.echo(f"{key:<12} {value}")
        if verify:
            if lavit.checkpoint.kind != "mlx":
                raise LaVITError("--verify needs an MLX folder (the released layout has no manifest)")
            problems = list(lavit.checkpoint.verify())
            if problems:
                raise LaVITError(f"{len(problems)} file(s) differ from the manifest, first: {problems[0][0]} ({problems[0][1]})")
            typer.echo("manifest     all files match their checksums")
    for warning in warnings:
        _note(f"warning: {warning}")


# ------------------------------------------------------------------------- understanding
def _print_results(results, as_json: bool, as_dict, as_text) -> int:
    """Print results (stdout) and one error line per input that could not be read (stderr);
    returns the exit code (1 if any input failed)."""
    failed = [r for r in results if r.error]
    if as_json:
        typer.echo(json.dumps([{"image": r.source, "error": r.error} if r.error else {"image": r.source, **as_dict(r)}
                               for r in results]))
    for r in results:
        if r.error:
            typer.echo(f"error: {r.error}", err=True)
        elif not as_json:
            typer.echo(as_text(r))
    if failed and len(results) > 1:
        typer.echo(f"error: {len(failed)} of {len(results)} images could not be read", err=True)
    return 1 if failed else 0


def _counter(reporter: "Reporter", stage: str, total: int):
    """A progress callback counting finished items."""
    done = [0]

    def advance(count: int) -> None:
        done[0] += count
        reporter.update(stage, done[0], total)

    return advance


@app.command()
def tokenize(
    images: List[Path] = typer.Argument(..., help="Image files (any format PIL reads)."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    sample: bool = typer.Option(
        False, "--sample", help="Sample the token selection (Gumbel, as the official inference) instead of the deterministic rule."
    ),
    seed: Optional[int] = _seed_option("--sample (image i uses seed + i)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {image, num_tokens, codes}."),
    overlay: Optional[Path] = typer.Option(None, "--overlay", show_default=False,
                                           help="Also draw the kept patches (outlined) and where each dropped patch "
                                                "goes (tinted) to this PNG (several images: NAME-1.png, ...)."),
    force: bool = ForceOption,
):
    """Turn images into LaVIT's dynamic discrete visual tokens."""
    from lavit_mlx.seeding import new_seed

    overlay_paths = _outputs(overlay, len(images), force) if overlay is not None else []
    _check_inputs(images, all_needed=False)
    if sample and seed is None:
        seed = new_seed()
        _note(f"sampling with --seed {seed}")
    lavit = _open_model(model, vision_heads)
    with Reporter({"tokenize": "tokenizing"}) as reporter:
        results = lavit.tokenize([str(p) for p in images], sample=sample, seed=seed, batch_size=batch_size,
                                 progress=_counter(reporter, "tokenize", len(images)), skip_bad=True)
    if overlay_paths:
        from lavit_mlx.generation import atomic_png
        from lavit_mlx.pictures import token_overlay

        for index, (image, result, path) in enumerate(zip(images, results, overlay_paths)):
            if result.error is None:
                picture = token_overlay(lavit, image, sample=sample, seed=None if seed is None else seed + index)
                atomic_png(picture.image, path)
                _note(f"overlay: {path} ({picture.num_tokens} tokens)")
    raise typer.Exit(_print_results(
        results, as_json, lambda r: {"num_tokens": r.num_tokens, "codes": r.codes.tolist()},
        lambda r: f"{r.source}: {r.num_tokens} tokens\n" + " ".join(str(c) for c in r.codes.tolist())))


def _decoding_checks(beams: int, sample: bool, min_tokens: Optional[int], max_tokens: int, default_min: int) -> int:
    """The checked --min-tokens (the release's default, capped by --max-tokens, when not given)."""
    from lavit_mlx.errors import LaVITError

    if sample and beams != 1:
        raise LaVITError(f"--sample draws words one at a time: use it with --beams 1 (got --beams {beams})")
    if min_tokens is None:
        return min(default_min, max_tokens)
    if min_tokens > max_tokens:
        raise LaVITError(f"--min-tokens {min_tokens} is more than --max-tokens {max_tokens}")
    return min_tokens


@app.command()
def caption(
    images: List[Path] = typer.Argument(..., help="Image files."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    quantize: Optional[Bits] = QuantizeOption,
    adapter: Optional[Path] = AdapterOption,
    prompt: str = typer.Option("", "--prompt", help="Text after the image (the release captions with none)."),
    beams: int = typer.Option(2, "--beams", min=1, help="Beam search width (1: greedy, or --sample)."),
    max_tokens: int = typer.Option(36, "--max-tokens", min=1, help="Most new tokens."),
    min_tokens: Optional[int] = typer.Option(None, "--min-tokens", min=0, show_default=False,
                                             help="Fewest new tokens. Default: 8 (the release), at most --max-tokens."),
    sample: bool = typer.Option(False, "--sample", help="Sample the words (needs --beams 1)."),
    sample_tokens: bool = typer.Option(False, "--sample-tokens", help="Sample the visual token selection, as the release does."),
    seed: Optional[int] = _seed_option("--sample and --sample-tokens (image i uses seed + i)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass."),
    as_json: bool = typer.Option(False, "--json", help='Print a JSON list of {"image", "caption"} (or "error").'),
):
    """Caption images (the release's settings: 2 beams, 8..36 tokens, cut at the first '.')."""
    from lavit_mlx.understanding import caption as run

    min_tokens = _decoding_checks(beams, sample, min_tokens, max_tokens, default_min=8)
    _check_inputs(images, all_needed=False)
    seed = _announce_seed(seed, sample or sample_tokens)
    lavit = _open_model(model, vision_heads, quantize, adapter)
    with Reporter({"caption": "captioning"}) as reporter:
        answers = run(lavit, [str(p) for p in images], prompt, num_beams=beams, max_new_tokens=max_tokens,
                      min_new_tokens=min_tokens, do_sample=sample, sample_tokens=sample_tokens, seed=seed,
                      batch_size=batch_size, skip_bad=True, progress=_counter(reporter, "caption", len(images)))
    raise typer.Exit(_print_results(answers, as_json, lambda a: {"caption": a.text}, lambda a: f"{a.source}: {a.text}"))


def _announce_seed(seed: Optional[int], random: bool) -> Optional[int]:
    if random and seed is None:
        from lavit_mlx.seeding import new_seed

        seed = new_seed()
        _note(f"sampling with --seed {seed}")
    return seed


@app.command()
def ask(
    image: Path = typer.Argument(..., help="Image file."),
    question: str = typer.Argument(..., help="The question."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    quantize: Optional[Bits] = QuantizeOption,
    adapter: Optional[Path] = AdapterOption,
    beams: int = typer.Option(5, "--beams", min=1, help="Beam search width."),
    max_tokens: int = typer.Option(10, "--max-tokens", min=1, help="Most new tokens."),
    min_tokens: Optional[int] = typer.Option(None, "--min-tokens", min=0, show_default=False,
                                             help="Fewest new tokens. Default: 2 (the release), at most --max-tokens."),
    sample_tokens: bool = typer.Option(False, "--sample-tokens", help="Sample the visual token selection, as the release does."),
    seed: Optional[int] = _seed_option("--sample-tokens"),
    as_json: bool = typer.Option(False, "--json", help='Print a JSON list of {"image", "answer"}.'),
):
    """Answer a question about an image ("Question: {} Answer:", 5 beams, 2..10 tokens)."""
    from lavit_mlx.errors import LaVITError
    from lavit_mlx.understanding import ask as run

    if not question.strip():
        raise LaVITError("the question is empty")
    min_tokens = _decoding_checks(beams, False, min_tokens, max_tokens, default_min=2)
    _check_inputs([image])
    seed = _announce_seed(seed, sample_tokens)
    lavit = _open_model(model, vision_heads, quantize, adapter)
    with _stderr().status("answering"):
        answers = run(lavit, [str(image)], question, num_beams=beams, max_new_tokens=max_tokens,
                      min_new_tokens=min_tokens, sample_tokens=sample_tokens, seed=seed, skip_bad=True)
    raise typer.Exit(_print_results(answers, as_json, lambda a: {"answer": a.text}, lambda a: f"{a.source}: {a.text}"))


# ------------------------------------------------------------------------- images
STAGE_LABELS = {"tokens": "image tokens (LLM)", "decode": "VQ decoder", "denoise": "denoising (UNet)",
                "vae": "VAE decode"}


def _run_pipeline(stages, settings, paths, model_name: str, reconstruction: bool = False):
    """Drive a generation pipeline with progress reporting and save the images."""
    from lavit_mlx.generation import Done, save_png

    done = None
    with Reporter(STAGE_LABELS) as reporter:
        for event in stages:
            if isinstance(event, Done):
                done = event
                break
            reporter.update(event.stage, event.done, event.total)
    for index, (image, path) in enumerate(zip(done.images, paths)):
        save_png(image, path, done.settings, index, model=model_name, reconstruction=reconstruction)
        typer.echo(str(path))
    seeds = done.settings.seed if len(paths) == 1 else f"{done.settings.seed}..{done.settings.seed + len(paths) - 1}"
    _note(f"wrote {len(paths)} image(s) of {done.settings.width}x{done.settings.height} in {done.seconds:.1f} s "
          f"(seed {seeds}; each PNG stores its own seed and every setting)")


def _image_settings(**values):
    """Checked settings (before anything loads); the drawn seed is printed."""
    from lavit_mlx.generation import GenerationSettings

    settings = GenerationSettings(**values).resolved()
    if values.get("seed") is None:
        _note(f"seed {settings.seed} (use --seed {settings.seed} to repeat)")
    return settings


DecoderOption = typer.Option("highres", "--decoder",
                             help="Pixel decoder: highres (SDXL-shaped) or lowres (SD-1.5-shaped, 512 px).")
RatioOption = typer.Option(None, "--ratio", show_default=False,
                           help="High-res aspect ratio (the release's six sizes; 1:1 is 1024x1024). "
                                "Default: the model's own size (bundled model: 224x224), else 1:1 "
                                "(lowres: 512x512).")
WidthOption = typer.Option(None, "--width", min=8, max=4096, show_default=False,
                           help="Width in pixels, a multiple of 8; needs --height. Default: from --ratio.")
HeightOption = typer.Option(None, "--height", min=8, max=4096, show_default=False,
                            help="Height in pixels, a multiple of 8; needs --width. Default: from --ratio.")
StepsOption = typer.Option(None, "--steps", min=1, max=1000, show_default=False,
                           help="Denoising steps. Default: the model's own (bundled model: 20), else 25 highres, "
                                "50 lowres (the release).")
GuidanceOption = typer.Option(None, "--guidance", min=0.0, show_default=False,
                              help="UNet classifier-free guidance. Default: the model's own (bundled model: 3.0), "
                                   "else 7.0 highres, 5.0 lowres (the release).")
SchedulerOption = typer.Option("ddim", "--scheduler",
                               help="Sampler: ddim (the release), euler or dpm++2m (fewer steps).")


def _outputs(out: Path, count: int, force: bool):
    from lavit_mlx.generation import check_outputs, output_paths

    paths = output_paths(out, count)
    check_outputs(paths, force)
    return paths


@app.command()
def generate(
    prompt: str = typer.Option("", "--prompt", "-p", help="Text; '<image>' marks where each --image goes."),
    image: List[Path] = typer.Option([], "--image", help="Prompt image (repeatable). Without a <image> mark it comes first."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    quantize: Optional[Bits] = QuantizeOption,
    adapter: Optional[Path] = AdapterOption,
    out: Path = typer.Option(Path("lavit.png"), "--out", "-o", help="Output PNG (-n > 1: NAME-1.png, NAME-2.png, ...)."),
    n: int = typer.Option(1, "-n", min=1, max=64, help="Number of images (image i uses seed + i)."),
    seed: Optional[int] = _seed_option("the LLM's sampling and the initial noise (image i uses seed + i)"),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", show_default=False,
                                                  help="Text the LLM guidance steers away from. Default: none."),
    decoder: Decoder = DecoderOption,
    ratio: Optional[Ratio] = RatioOption,
    width: Optional[int] = WidthOption,
    height: Optional[int] = HeightOption,
    steps: Optional[int] = StepsOption,
    guidance: Optional[float] = GuidanceOption,
    llm_guidance: Optional[float] = typer.Option(None, "--llm-guidance", min=0.0, show_default=False,
                                                 help="LLM guidance. Default: 4.0, 5.0 with an image (the release)."),
    scheduler: Scheduler = SchedulerOption,
    low_memory: bool = typer.Option(False, "--low-memory", help="Free the LLM before the UNet runs."),
    force: bool = ForceOption,
):
    """Generate images from text or text + image prompts."""
    from lavit_mlx.generation import generate_stages, prompt_pieces

    settings = _image_settings(prompt=prompt, images=[str(p) for p in image], negative_prompt=negative_prompt,
                               seed=seed, num_images=n, decoder=decoder, ratio=ratio, width=width, height=height,
                               steps=steps, guidance=guidance, llm_guidance=llm_guidance, scheduler=scheduler,
                               low_memory=low_memory)
    prompt_pieces(settings.prompt, settings.images)
    _check_inputs(image)
    paths = _outputs(out, n, force)
    lavit = _open_model(model, vision_heads, quantize, adapter)
    _run_pipeline(generate_stages(lavit, settings), settings, paths, str(lavit.checkpoint.path))


@app.command()
def reconstruct(
    image: Path = typer.Argument(..., help="Image to tokenize and decode again."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    out: Path = typer.Option(Path("reconstruction.png"), "--out", "-o", help="Output PNG."),
    n: int = typer.Option(1, "-n", min=1, max=64, help="Number of images (image i uses seed + i)."),
    seed: Optional[int] = _seed_option("the initial noise (image i uses seed + i)"),
    decoder: Decoder = DecoderOption,
    ratio: Optional[Ratio] = RatioOption,
    width: Optional[int] = WidthOption,
    height: Optional[int] = HeightOption,
    steps: Optional[int] = StepsOption,
    guidance: Optional[float] = GuidanceOption,
    scheduler: Scheduler = SchedulerOption,
    side_by_side: Optional[Path] = typer.Option(None, "--side-by-side", show_default=False,
                                                help="Also write original | reconstruction | kept-patch overlay to "
                                                     "this PNG."),
    force: bool = ForceOption,
):
    """Reconstruct an image from its own visual tokens (shows what the tokenizer keeps)."""
    from lavit_mlx.generation import reconstruct_stages
    from lavit_mlx.image_processing import load_image

    settings = _image_settings(prompt="", images=[str(image)], seed=seed, num_images=n, decoder=decoder,
                               ratio=ratio, width=width, height=height, steps=steps, guidance=guidance,
                               scheduler=scheduler)
    original = load_image(image)  # a bad image fails here, before the model loads
    paths = _outputs(out, n, force)
    extra = _outputs(side_by_side, 1, force) if side_by_side is not None else []
    lavit = _open_model(model, vision_heads)
    _run_pipeline(reconstruct_stages(lavit, str(image), settings), settings, paths, str(lavit.checkpoint.path),
                  reconstruction=True)
    if extra:
        from PIL import Image

        from lavit_mlx.generation import atomic_png
        from lavit_mlx.pictures import side_by_side as compose, token_overlay

        picture = token_overlay(lavit, original)
        atomic_png(compose([original, Image.open(paths[0]), picture.image],
                           ["original", "reconstruction", f"{picture.num_tokens} kept tokens"]), extra[0])
        _note(f"side by side: {extra[0]}")


# ------------------------------------------------------------------------- evaluation
eval_app = typer.Typer(help="Evaluate a model: the paper's metrics, token statistics, the shapes world's gates.",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(eval_app, name="eval")

DataOption = typer.Option(..., "--data", "-d", show_default=False,
                          help="A JSONL manifest, a COCO caption file (with --images), the Karpathy split file, or "
                               "VQAv2's questions file (with --images and --annotations).")
ImagesOption = typer.Option(None, "--images", show_default=False, help="The image folder of a COCO/VQAv2 file.")
LimitOption = typer.Option(None, "--limit", min=1, show_default=False, help="Evaluate only the first N records.")
EvalOutOption = typer.Option(Path("eval"), "--out", "-o", help="Folder for the report, the predictions and pictures.")
JsonOption = typer.Option(False, "--json", help="Print the report as JSON instead of a table.")


def _write_eval(report, predictions, out: Path, as_json: bool) -> None:
    """The report (JSON + a table on stdout) and the predictions, written into `out`."""
    from lavit_mlx.eval.report import format_table, write_atomic, write_report

    out.mkdir(parents=True, exist_ok=True)
    path = write_report(report, out / f"{report['task']}_report.json", force=True)
    write_atomic(out / f"{report['task']}_predictions.jsonl",
                 "".join(json.dumps(p) + "\n" for p in predictions).encode(), force=True)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(format_table([{"metric": k, "value": v} for k, v in _flat_metrics(report["metrics"])]))
        passed = (report.get("settings") or {}).get("passed")
        skipped = (report.get("settings") or {}).get("skipped") or {}
        if passed or skipped:
            rows = [{"gate": k, "passed": "yes" if v else "NO"} for k, v in (passed or {}).items()]
            rows += [{"gate": k, "passed": f"skipped ({why})"} for k, why in skipped.items()]
            typer.echo(format_table(rows))
    _note(f"report: {path}")


def _flat_metrics(metrics: dict, prefix: str = ""):
    """(dotted name, number) pairs of a nested metrics dict, for the table."""
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _flat_metrics(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def _eval_progress(reporter: "Reporter"):
    return lambda stage, done, total: reporter.update(stage, done, total)


@eval_app.command("caption")
def eval_caption(
    data: Path = DataOption,
    images: Optional[Path] = ImagesOption,
    split: str = typer.Option("test", "--split", help="Karpathy split."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    limit: Optional[int] = LimitOption,
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass."),
    beams: int = typer.Option(2, "--beams", min=1, help="Beam search width (the release's 2)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed (token selection sampling, if any)."),
    out: Path = EvalOutOption,
    as_json: bool = JsonOption,
):
    """Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) with the COCO caption code."""
    from lavit_mlx.eval import run

    records = run.read_records("caption", data, images, split=split, limit=limit)
    lavit = _open_model(model, vision_heads)
    with Reporter({}) as reporter:
        report, predictions = run.caption(lavit, records, [data], batch_size, seed, _eval_progress(reporter),
                                          num_beams=beams)
    _write_eval(report, predictions, out, as_json)


@eval_app.command("vqa")
def eval_vqa(
    data: Path = DataOption,
    images: Optional[Path] = ImagesOption,
    annotations: Optional[Path] = typer.Option(None, "--annotations", show_default=False,
                                               help="VQAv2's annotations file (the answers)."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    limit: Optional[int] = LimitOption,
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass."),
    beams: int = typer.Option(5, "--beams", min=1, help="Beam search width (the release's 5)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed (token selection sampling, if any)."),
    out: Path = EvalOutOption,
    as_json: bool = JsonOption,
):
    """VQA accuracy: VQAv2's 10-annotator rule, exact match for single answers."""
    from lavit_mlx.eval import run

    records = run.read_records("vqa", data, images, annotations, limit=limit)
    lavit = _open_model(model, vision_heads)
    with Reporter({}) as reporter:
        report, predictions = run.vqa(lavit, records, [p for p in (data, annotations) if p], batch_size, seed,
                                      _eval_progress(reporter), num_beams=beams)
    _write_eval(report, predictions, out, as_json)


@eval_app.command("t2i")
def eval_t2i(
    data: Path = DataOption,
    images: Optional[Path] = ImagesOption,
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    limit: Optional[int] = LimitOption,
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", show_default=False,
                                                     help="Inception-v3 weights for FID (torch-fidelity's "
                                                          "pt_inception file; nothing is downloaded)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per batch."),
    steps: Optional[int] = StepsOption,
    width: Optional[int] = WidthOption,
    height: Optional[int] = HeightOption,
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed of the first image (image i: seed + i)."),
    out: Path = EvalOutOption,
    as_json: bool = JsonOption,
):
    """Generate from captions: FID against the references (with --inception-weights) and the shapes checker."""
    from lavit_mlx.eval import run
    from lavit_mlx.generation import GenerationSettings

    settings = _image_settings(seed=seed, steps=steps, width=width, height=height)
    if inception_weights is not None and not inception_weights.is_file():
        from lavit_mlx.errors import LaVITError

        raise LaVITError(f"{inception_weights}: no such Inception weights file")
    records = run.read_records("t2i", data, images, limit=limit)
    lavit = _open_model(model, vision_heads)
    with Reporter({}) as reporter:
        report, predictions = run.t2i(lavit, records, [data], out, settings, batch_size, inception_weights,
                                      _eval_progress(reporter))
    _write_eval(report, predictions, out, as_json)
    _note(f"images: {out / 'images'}, contact sheet: {out / 'contact_sheet.png'}")


@eval_app.command("tokens")
def eval_tokens(
    images: Path = typer.Option(..., "--images", "-i", show_default=False,
                                help="A folder of images, or a JSONL manifest (its extra columns, e.g. "
                                     "num_objects, split the statistics)."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    limit: Optional[int] = LimitOption,
    rho: Optional[float] = typer.Option(None, "--rho", min=0.0, max=1.0, show_default=False,
                                        help="The target keep ratio to compare with. Default: 1/3 (the paper)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass."),
    out: Path = EvalOutOption,
    as_json: bool = JsonOption,
):
    """Tokens per image, kept fraction against rho, codebook usage (by label), and a histogram."""
    from lavit_mlx.eval import run

    records = run.read_records("tokens", images, limit=limit)
    lavit = _open_model(model, vision_heads)
    with Reporter({}) as reporter:
        report, predictions = run.tokens(lavit, records, [images] if images.is_file() else [], out, rho, batch_size,
                                         _eval_progress(reporter))
    _write_eval(report, predictions, out, as_json)


@eval_app.command("shapes")
def eval_shapes(
    model: Optional[Path] = ModelOption,
    seed: int = typer.Option(10_000, "--seed", min=0, max=2**32 - 1, help="Seed of the fresh scenes."),
    scenes: int = typer.Option(200, "--scenes", min=1, help="Scenes captioned and questioned."),
    prompts: int = typer.Option(100, "--prompts", min=1, help="Captions turned into images."),
    reconstructions: int = typer.Option(50, "--reconstructions", min=1, help="Scenes reconstructed."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Items per batch."),
    out: Path = EvalOutOption,
    as_json: bool = JsonOption,
):
    """The shapes world's quality gates (caption, VQA, text-to-image, reconstruction, dynamic tokens)."""
    from lavit_mlx.eval import run

    lavit = _open_model(model, None)
    with Reporter({}) as reporter:
        report, predictions = run.shapes(lavit, seed, scenes, prompts, reconstructions,
                                         batch_size, _eval_progress(reporter))
    _write_eval(report, predictions, out, as_json)


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="A training run folder (with log.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", show_default=False,
                                       help="Output PNG. Default: RUN_DIR/curves.png."),
):
    """Plot a training run's curves (losses, kept tokens, codebook usage, learning rate) as one PNG."""
    from lavit_mlx.pictures import plot_run

    typer.echo(str(plot_run(run_dir, out or Path(run_dir) / "curves.png")))


# ------------------------------------------------------------------------- training
Stage = Literal["encoder", "tokenizer", "llm", "pixel", "vae", "shapes"]
BuildStage = Literal["data", "encoder", "tokenizer", "select", "quantizer", "vae", "llm", "pixel", "compose"]


@app.command(name="train")
def train_command(
    stage: Stage = typer.Argument(..., help="The stage to train: encoder, tokenizer (stage 1), llm (stage 2), "
                                            "pixel (stage 3), vae; or shapes: the bundled model from nothing "
                                            "(every stage on the shapes world, then the float16 folder)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", show_default=False,
                                          help="The run's YAML file (stage, out, model, data, train, loss). "
                                               "Not with shapes (its stages use lavit_mlx/shapes/configs)."),
    overrides: List[str] = typer.Option([], "--set", show_default=False,
                                        help="Override a config value, e.g. --set train.steps=100 (repeatable); "
                                             "with shapes prefix the stage: --set llm.train.steps=100."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", show_default=False,
                                       help="The run folder (the config's `out`). shapes: default runs/shapes."),
    seed: Optional[int] = typer.Option(None, "--seed", show_default=False,
                                       help="train.seed, 0..4294967295 (shapes: also the world's seed; default 0)."),
    stop_after: Optional[BuildStage] = typer.Option(None, "--stop-after", show_default=False,
                                                    help="shapes only: the last step to run."),
    steps_scale: float = typer.Option(1.0, "--steps-scale", help="shapes only: every stage's steps times this "
                                                                 "(0.05: a quick trial build)."),
    scenes: int = typer.Option(6000, "--scenes", help="shapes only: training scenes rendered."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore the run folder's checkpoints (default: resume from the latest)."),
):
    """Train one LaVIT stage in MLX (resumes from the run folder's latest checkpoint), or build the shapes model."""
    from lavit_mlx.seeding import check_seed

    if seed is not None:
        check_seed(seed)
    if stage == "shapes":
        from lavit_mlx.errors import LaVITError
        from lavit_mlx.shapes.build import BuildOptions, build, parse_overrides

        if config is not None:
            raise LaVITError("--config: the shapes build reads its own configs (use --set STAGE.KEY=VALUE)")
        out = out or Path("runs/shapes")
        if fresh and out.exists():
            raise LaVITError(f"--fresh: remove {out} yourself to rebuild from nothing (it is not deleted for you)")
        options = BuildOptions(out=out, seed=seed or 0, train_scenes=scenes, steps_scale=steps_scale,
                               overrides=parse_overrides(overrides), stop_after=stop_after)
        options.check()
        typer.echo(str(build(options, log=_note)))
        return
    from lavit_mlx.training import run

    extra = ([f"out={out}"] if out else []) + ([f"train.seed={seed}"] if seed is not None else [])
    last = run(stage, config, list(overrides) + extra, resume=not fresh)
    if last:
        typer.echo(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items()
                            if k != "time"))


# ------------------------------------------------------------------------- fine-tuning
Task = Literal["caption", "vqa", "generate", "mixed"]


@app.command()
def finetune(
    data: Path = typer.Option(..., "--data", help="JSONL manifest of {image, text} captions and/or "
                              "{image, question, answer} pairs (paths relative to the manifest)."),
    out: Path = typer.Option(..., "--out", "-o", help="The adapter folder (also holds checkpoints and the log; "
                             "a rerun resumes)."),
    task: Task = typer.Option("caption", "--task", help="caption, vqa (text targets), generate (image targets) "
                              "or mixed."),
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    rank: int = typer.Option(8, "--rank", help="LoRA rank."),
    layers: int = typer.Option(-1, "--layers", help="Adapters in the last N transformer blocks (-1: all)."),
    scale: float = typer.Option(20.0, "--scale", help="LoRA scale (mlx-lm's: the update is scale * x A B)."),
    dora: bool = typer.Option(False, "--dora", help="DoRA instead of LoRA."),
    qlora: bool = typer.Option(False, "--qlora", help="Train on the LLM quantized at load (4-bit unless --quantize)."),
    quantize: Optional[Bits] = QuantizeOption,
    visual_rows: Optional[bool] = typer.Option(None, "--visual-rows/--no-visual-rows", show_default=False,
                                               help="Train the [IMG], [/IMG] and visual-id rows in full. "
                                                    "Default: with --task generate or mixed."),
    tune_understanding: bool = typer.Option(False, "--tune-understanding",
                                            help="Also train the understanding merger and vit_proj."),
    steps: int = typer.Option(200, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per step."),
    grad_accumulation: int = typer.Option(1, "--grad-accumulation", help="Micro-batches per step."),
    learning_rate: float = typer.Option(1e-4, "--learning-rate", help="Peak learning rate (AdamW, cosine)."),
    max_length: int = typer.Option(512, "--max-length", help="Longest sequence (longer ones are cut)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", show_default=False,
                                             help="A manifest for the eval loss at the end."),
    save_every: int = typer.Option(100, "--save-every", help="Checkpoint every N steps (0: only at the end)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the adapters' init and the data order, 0..4294967295."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore the checkpoints in --out (default: resume)."),
    estimate: bool = typer.Option(False, "--estimate-memory",
                                  help="Print the memory this run needs (from the config alone) and exit."),
):
    """Fine-tune the LLM with LoRA/DoRA/QLoRA on image-text data; writes mlx-lm adapter files."""
    from lavit_mlx.training.finetune import FinetuneOptions, estimate_memory
    from lavit_mlx.training.finetune import finetune as run

    options = FinetuneOptions(model=str(_model_path(model)), data=str(data), out=str(out), task=task, rank=rank,
                              layers=layers, scale=scale, dora=dora, qlora=qlora,
                              quantize=int(quantize) if quantize else None, visual_rows=visual_rows,
                              tune_understanding=tune_understanding, steps=steps, batch_size=batch_size,
                              grad_accumulation=grad_accumulation, learning_rate=learning_rate, seed=seed,
                              eval_data=str(eval_data) if eval_data else None, save_every=save_every,
                              max_length=max_length, vision_heads=vision_heads)
    options.check()
    if estimate:
        typer.echo(estimate_memory(options))
        return
    last = run(options, resume=not fresh)
    typer.echo(f"wrote the adapter to {out} (" + " ".join(
        f"{k} {v:.4g}" for k, v in last.items() if k in ("step", "loss", "eval_loss") and v is not None) + ")")


@app.command()
def fuse(
    adapter: Path = typer.Option(..., "--adapter", help="The adapter folder of lavit finetune."),
    out: Path = typer.Option(..., "--out", "-o", help="The new MLX model folder."),
    model: Optional[Path] = ModelOption,
    force: bool = ForceOption,
):
    """Fold an adapter into a copy of the model: a new MLX folder that needs no --adapter."""
    from lavit_mlx.training.finetune import fuse as run

    start = time.perf_counter()
    written = run(_model_path(model), adapter, out, force=force)
    typer.echo(f"wrote {written} in {time.perf_counter() - start:.1f} s")


# ------------------------------------------------------------------------- convert
@app.command()
def convert(
    src: str = typer.Argument(..., help="A released-layout folder, a lavit_train checkpoint, a Hugging Face repo id "
                              "(e.g. rain1011/LaVIT-7B-v2), or (with --to torch) an MLX folder."),
    out: Path = typer.Argument(..., help="Output folder (written atomically)."),
    to: Literal["mlx", "torch"] = typer.Option("mlx", "--to", help="Target format."),
    dtype: Optional[Literal["float16", "bfloat16", "float32"]] = typer.Option(None, "--dtype",
                                        show_default=False,
                                        help="Weight dtype. Default: the source's (a bfloat16 release stays bfloat16)."),
    quantize: Optional[Bits] = typer.Option(None, "--quantize", show_default=False,
                                           help="Quantize the LLM to 4 or 8 bits. Default: not quantized."),
    group_size: Literal["32", "64", "128"] = typer.Option("64", "--group-size",
                                   help="Quantization group size."),
    quantize_vision: bool = typer.Option(False, "--quantize-vision", help="Also quantize the vision components to 8 bits."),
    quantize_unet: bool = typer.Option(False, "--quantize-unet", help="Also quantize the UNets' linear layers to 8 bits."),
    components: Optional[str] = typer.Option(
        None, "--components", show_default=False,
        help="Comma-separated subset: eva, tokenizer, understanding, lowres_decoder, highres_decoder, llm, "
             "highres_pixel, lowres_pixel. Default: all the source has. Text-to-image needs llm, "
             "highres_decoder, highres_pixel.",
    ),
    vision_heads: Optional[int] = VisionHeadsOption,
    safetensors: bool = typer.Option(False, "--safetensors", help="With --to torch: write the LLM as safetensors instead of .bin."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only once the new one is complete)."),
):
    """Convert a LaVIT checkpoint to the MLX folder format (or back to PyTorch)."""
    from lavit_convert.writer import check_destination, interruptible
    from lavit_mlx.errors import LaVITError

    check_destination(out, force)
    progress_line = lambda name: _note(name if name.startswith("note:") else f"converting {name}")  # noqa: E731
    start = time.perf_counter()
    if to == "torch":
        if dtype or quantize or quantize_vision or quantize_unet or components or vision_heads:
            raise LaVITError("--to torch takes only --safetensors and --force (the MLX folder fixes everything else)")
        from lavit_convert.to_torch import convert_to_torch

        with interruptible():
            written = convert_to_torch(src, out, force=force, safetensors=safetensors, progress=progress_line)
        typer.echo(f"wrote {out} (released PyTorch layout) in {time.perf_counter() - start:.1f} s: {', '.join(written)}")
        return
    from lavit_convert.hub import resolve_source
    from lavit_convert.to_mlx import ALL_COMPONENTS, ConvertOptions, convert_to_mlx

    chosen = [c.strip() for c in components.split(",") if c.strip()] if components else None
    unknown = [c for c in chosen or [] if c not in ALL_COMPONENTS]
    if unknown:
        raise LaVITError(f"--components: unknown component {unknown[0]!r}; choose from {', '.join(ALL_COMPONENTS)}")
    options = ConvertOptions(components=chosen, dtype=dtype, quantize=int(quantize) if quantize else None,
                             group_size=int(group_size), quantize_vision=quantize_vision, quantize_unet=quantize_unet,
                             vision_heads=vision_heads, force=force)
    options.check()
    source = resolve_source(src, chosen or list(ALL_COMPONENTS))
    with interruptible():
        report = convert_to_mlx(source, out, options, progress=progress_line)
    typer.echo(f"wrote {out} (MLX folder, {report.bytes_written / 2**30:.2f} GiB, {report.dtype}) in "
               f"{time.perf_counter() - start:.1f} s: {', '.join(report.components)}")
    for component, layers in report.unquantized.items():
        typer.echo(f"left unquantized in {component} (width not divisible by {group_size}): {', '.join(layers)}")


# ------------------------------------------------------------------------- serving
@app.command()
def serve(
    model: Optional[Path] = ModelOption,
    vision_heads: Optional[int] = VisionHeadsOption,
    quantize: Optional[Bits] = QuantizeOption,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LAVIT_API_KEY", show_default=False,
                                          help="Require 'Authorization: Bearer KEY' on every route but /health "
                                               "and the page. Default: $LAVIT_API_KEY, else none."),
    queue_size: int = typer.Option(16, "--queue-size", min=1, help="Requests that may wait; more get HTTP 429."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Understanding requests decoded in one forward."),
    timeout: float = typer.Option(600.0, "--timeout", min=0.001, help="Seconds a request may take, waiting included."),
):
    """Serve the model over HTTP: an OpenAI-compatible API (chat completions with images, image
    generations) and a web page at /."""
    from lavit_mlx.serve import check_options, serve as run

    check_options(host, port, api_key, queue_size, max_batch, timeout)
    run(_model_path(model), host=host, port=port, api_key=api_key, vision_heads=vision_heads,
        quantize=int(quantize) if quantize else None, max_queue=queue_size, max_batch=max_batch,
        time_limit=timeout, announce=_note)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `lavit` console script."""
    import lavit_mlx  # noqa: F401  (loads the fast BLAS before anything imports mlx)
    from lavit_mlx.errors import LaVITError

    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="lavit", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        if code == 130:  # typer turns Ctrl-C (and SIGTERM during a conversion) into exit code 130
            print("error: interrupted", file=sys.stderr, flush=True)
    except (typer.Abort, click.exceptions.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr, flush=True)
        code = 130
    except (typer.Exit, click.exceptions.Exit) as exc:
        code = exc.exit_code
        if isinstance(exc.__cause__, KeyboardInterrupt):  # typer turns Ctrl-C (and our SIGTERM) into Exit(130)
            print("error: interrupted", file=sys.stderr, flush=True)
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
    except MemoryError:
        typer.echo("error: out of memory; try a smaller size, fewer images, --low-memory or a quantized model", err=True)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
