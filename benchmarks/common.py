"""The harness the benchmarks share: workers, timing, peak memory, the header, tables.

Each benchmark script is its own parent and its own workers. The parent writes the
weights once, then runs `python SCRIPT --worker NAME ...` once per framework and round
(`run_rounds`: A B, then B A, so a burst of load on a shared machine hits both sides).
A worker (`serve`) sets its framework up, runs the benchmark's function, notes its peak
resident memory so far, then describes itself: BLAS library, its kernel, a measured
float32 1024^2 matmul, the allocator. `print_header` is built from those descriptions,
so it describes the processes that ran the benchmark. Other commands (`lavit generate`)
are measured from outside (`run_measured`, `os.wait4`).

Same allocator on both sides: importing `lavit_mlx` tunes glibc malloc in the MLX
process with `mallopt` (`lavit_mlx.cpu.runtime.MALLOC_TUNING`); a PyTorch worker calls
the same `runtime.tune_malloc()` before torch is imported. PyTorch workers run with
`LAVIT_NO_OPENBLAS=1`, so lavit's OpenBLAS is not loaded into them (torch keeps its own
MKL/oneDNN). Worker output goes to stderr; stdout holds only the header and the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

LABELS = {"mlx": "MLX", "torch": "PyTorch"}
MALLOPT_NAMES = {-1: "M_TRIM_THRESHOLD", -2: "M_TOP_PAD", -3: "M_MMAP_THRESHOLD"}  # glibc malloc.h
VERSIONS = ("numpy", "mlx", "mlx-lm", "torch", "transformers", "diffusers")
MATMUL_SIZE = 1024
GIB = 2**30
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------- parent side
@dataclass(frozen=True)
class Worker:
    """A worker process: `name` is its `--worker` value, `frameworks` those it runs and describes."""

    name: str
    frameworks: Tuple[str, ...]
    env: Tuple[Tuple[str, str], ...] = ()  # extra environment, e.g. (("LAVIT_NO_SKINNY_SGEMM", "1"),)

    def environment(self) -> Dict[str, str]:
        env = dict(os.environ)
        if "mlx" not in self.frameworks:
            env["LAVIT_NO_OPENBLAS"] = "1"  # torch keeps its own BLAS
        env.update(self.env)
        return env


MLX = Worker("mlx", ("mlx",))
TORCH = Worker("torch", ("torch",))


@dataclass
class WorkerRun:
    """One finished worker process."""

    worker: Worker
    result: dict  # what the benchmark's work function returned
    environment: dict  # the worker's description of itself (`describe_process`)
    peak_rss: int  # bytes: the process' peak until its work was done (not counting the description)
    seconds: float  # wall time of the process
    folder: Path  # where the worker could leave files (arrays to compare)


@dataclass
class Measured:
    returncode: int
    peak_rss: int  # bytes
    seconds: float


def run_measured(cmd: Sequence, env: Optional[Dict[str, str]] = None) -> Measured:
    """Run `cmd`, its output on our stderr; its own peak resident memory comes from `wait4`."""
    sys.stdout.flush()
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=sys.stderr)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return Measured(proc.returncode, usage.ru_maxrss * _RSS_UNIT, seconds)


def run_worker(script: str, worker: Worker, argv: Sequence[str], folder: Path) -> WorkerRun:
    """Run one worker of `script` with the benchmark options `argv`; its results land in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    print(f"[{worker.name} worker: {folder.name}]", file=sys.stderr, flush=True)
    cmd = [sys.executable, script, "--worker", worker.name, "--frameworks", ",".join(worker.frameworks),
           "--out", str(folder), *argv]
    measured = run_measured(cmd, worker.environment())
    if measured.returncode:
        raise SystemExit(f"the {worker.name} worker failed (exit code {measured.returncode}); its output is above")
    payload = json.loads((folder / "result.json").read_text())
    return WorkerRun(worker, payload["result"], payload["environment"], payload["peak_rss"], measured.seconds, folder)


def run_rounds(script: str, workers: Sequence[Worker], argv: Sequence[str], folder: Path,
               rounds: int = 1) -> Dict[str, List[WorkerRun]]:
    """Each worker once per round, the order reversed every other round (A B, B A, ...).

    Returns:
        {worker name: its runs, one per round}.
    """
    runs: Dict[str, List[WorkerRun]] = {w.name: [] for w in workers}
    for number in range(rounds):
        order = workers if number % 2 == 0 else list(reversed(workers))
        for worker in order:
            runs[worker.name].append(run_worker(script, worker, argv, Path(folder) / f"{worker.name}-{number + 1}"))
    return runs


def best(runs: Sequence[WorkerRun], key: str, better: Callable = max):
    """The best value of `key` over a worker's rounds (`max` for rates, `min` for times)."""
    return better(run.result[key] for run in runs)


def best_by_key(runs: Sequence[WorkerRun], key: str, better: Callable = max) -> dict:
    """For a result that is a {label: number} mapping, the best number of each label."""
    return {label: better(run.result[key][label] for run in runs) for label in runs[0].result[key]}


# ----------------------------------------------------------------------------- options
def add_arguments(parser: argparse.ArgumentParser, rounds: int = 1) -> None:
    """The options every benchmark has: --quick, --rounds, and the hidden worker options."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one repeat: checks that the benchmark runs (numbers mean nothing)")
    parser.add_argument("--rounds", type=int, default=rounds,
                        help="processes per framework, alternating; each measurement keeps its best")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--frameworks", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)


def parse(parser: argparse.ArgumentParser, quick: Dict[str, Any],
          argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; with --quick, the options not given take `quick`'s values."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.quick and not args.worker:
        for dest, value in quick.items():
            flags = [flag for action in parser._actions if action.dest == dest for flag in action.option_strings]
            if not any(arg == flag or arg.startswith(flag + "=") for arg in argv for flag in flags):
                setattr(args, dest, value)
    return args


def forward(args: argparse.Namespace, skip: Iterable[str] = ()) -> List[str]:
    """The parsed options as a command line for the workers (flags named after their dest)."""
    skipped = {"worker", "frameworks", "out", "quick", "rounds", *skip}
    argv: List[str] = []
    for dest, value in vars(args).items():
        flag = "--" + dest.replace("_", "-")
        if dest in skipped or value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv.append(f"{flag}={value}")
    return argv


# ----------------------------------------------------------------------------- worker side
def serve(args: argparse.Namespace, work: Callable[[argparse.Namespace], dict]) -> None:
    """The body of a worker process: set up, run `work(args)`, describe this process.

    `work` returns a JSON-serialisable dict; it may write files to `Path(args.out)`.
    """
    frameworks = args.frameworks.split(",")
    # Importing the package runs `prepare()`: OpenBLAS for MLX (unless LAVIT_NO_OPENBLAS)
    # and mallopt. A PyTorch-only worker applies the same mallopt explicitly, before torch.
    from lavit_mlx.cpu import runtime

    malloc_tuned = runtime.STATE.malloc_tuned if "mlx" in frameworks else runtime.tune_malloc()
    result = work(args)
    peak_rss = peak_rss_so_far()
    environment = describe_process(frameworks)
    environment["malloc_tuned"] = malloc_tuned
    payload = {"result": result, "environment": environment, "peak_rss": peak_rss}
    (Path(args.out) / "result.json").write_text(json.dumps(payload))


def peak_rss_so_far() -> int:
    """This process' peak resident memory until now, in bytes.

    On Linux the address space's own high-water mark (VmHWM): `ru_maxrss` also counts the
    parent's resident memory at the moment this process was started (the kernel carries the
    old address space's peak across exec), which is not this process' use.
    """
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT


def describe_process(frameworks: Sequence[str]) -> dict:
    """This process: versions, and per framework its BLAS, kernel and measured matmul speed."""
    from lavit_mlx.cpu import runtime

    description: Dict[str, Any] = {"python": platform.python_version(), "versions": package_versions()}
    if "mlx" in frameworks:
        import mlx.core as mx

        threads = "".join(f", {k}={os.environ[k]}" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
                          if k in os.environ)
        description["mlx"] = {"blas": runtime.blas_line(measure=False) + threads,
                              "gflops": runtime.measure_gflops(MATMUL_SIZE), "device": str(mx.default_device()),
                              "warnings": list(runtime.STATE.warnings)}
    if "torch" in frameworks:
        import torch

        threads = torch.get_num_threads()
        blas = f"{torch_blas()}, {threads} thread{'s' if threads != 1 else ''}"
        if runtime.STATE.path:
            blas += " (lavit's OpenBLAS is loaded in this process too)"
        description["torch"] = {"blas": blas, "gflops": torch_gflops(MATMUL_SIZE)}
    return description


def package_versions() -> Dict[str, str]:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def torch_blas() -> str:
    """torch's BLAS, as its build reports it: MKL / oneDNN / OpenBLAS, and its CPU kernel set."""
    import torch

    shown = torch.__config__.show()
    parts = []
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", shown)
    if mkl and torch.backends.mkl.is_available():
        parts.append(f"MKL {mkl.group(1)}")
    blas_info = re.search(r"BLAS_INFO=(\w+)", shown)
    if blas_info and blas_info.group(1) != "mkl":
        parts.append(f"BLAS {blas_info.group(1)}")  # e.g. 'open' (OpenBLAS) on aarch64 builds
    onednn = re.search(r"MKL-DNN (v[\w.]+)", shown)
    if onednn and torch.backends.mkldnn.is_available():
        parts.append(f"oneDNN {onednn.group(1)}")
    text = " + ".join(parts) or "no BLAS reported by torch.__config__.show()"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{text}, kernel {capability} (ATen CPU capability)"


def torch_gflops(size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """Measured float32 matmul throughput of torch on the CPU (GFLOP/s), as `runtime.measure_gflops`."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    with torch.no_grad():
        a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
    return 2 * size**3 / ((time.perf_counter() - start) / repeats) / 1e9


@dataclass
class Timing:
    best: float  # seconds
    times: List[float] = field(default_factory=list)
    output: Any = None


def timed(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Timing:
    """Call `fn` `warmup` times untimed, then `repeats` times; the best time and the last output.

    `fn` must finish its work before returning (mx.eval / .numpy()).
    """
    output = None
    for _ in range(warmup):
        output = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = fn()
        times.append(time.perf_counter() - start)
    return Timing(min(times), times, output)


# ----------------------------------------------------------------------------- report
def machine() -> str:
    """CPU model, usable and physical cores, memory, OS."""
    model, physical = platform.processor() or platform.machine(), None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        text = cpuinfo.read_text()
        names = re.findall(r"^model name\s*:\s*(.+)$", text, re.M)
        model = names[0].strip() if names else model
        cores = set(re.findall(r"^physical id\s*:\s*(\d+)\s*$.*?^core id\s*:\s*(\d+)\s*$", text, re.M | re.S))
        physical = len(cores) or None
    elif sys.platform == "darwin":
        done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        model = done.stdout.strip() or model
    from lavit_mlx.cpu.runtime import usable_cores

    usable = usable_cores()
    cores = f"{usable} of {os.cpu_count()} logical CPUs usable"
    if physical:
        cores += f", {physical} physical cores"
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total = re.search(r"^MemTotal:\s*(\d+) kB", meminfo.read_text(), re.M)
        memory = f", {int(total.group(1)) * 1024 / GIB:.1f} GiB memory" if total else ""
    return f"{model}, {cores}{memory}, {platform.system()} {platform.release()} {platform.machine()}"


def _spread(values: Sequence[float], unit: str) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f} {unit}"
    return f"{max(values):.0f} {unit} (rounds: {', '.join(f'{v:.0f}' for v in values)})"


def header_lines(title: str, runs: Dict[str, List[WorkerRun]]) -> List[str]:
    """The header, from the workers' own descriptions of themselves."""
    from lavit_mlx.cpu.runtime import MALLOC_TUNING

    all_runs = [run for worker_runs in runs.values() for run in worker_runs]
    first = all_runs[0].environment
    versions = ", ".join(f"{name} {version}" for name, version in first["versions"].items())
    lines = [f"# {title}", f"machine: {machine()}", f"software: Python {first['python']}, {versions}"]
    for framework, label in LABELS.items():
        described = False
        for name, worker_runs in runs.items():
            if framework not in worker_runs[0].environment:
                continue
            described = True
            facts = [run.environment[framework] for run in worker_runs]
            speed = _spread([f["gflops"] for f in facts], "GFLOP/s")
            lines.append(f"{label} BLAS ({name} worker): {facts[0]['blas']}; "
                         f"float32 {MATMUL_SIZE}^2 matmul {speed}")
            lines += [f"warning ({name} worker): {w}" for w in facts[0].get("warnings", [])]
        if not described:
            lines.append(f"{label} BLAS: no {label} worker ran")
    settings = ", ".join(f"{MALLOPT_NAMES.get(k, k)} {v // 2**20} MiB" for k, v in MALLOC_TUNING.items())
    tuned = ", ".join(f"{name} {'yes' if all(r.environment['malloc_tuned'] for r in rs) else 'NO'}"
                      for name, rs in runs.items())
    lines.append(f"allocator: glibc malloc tuned in-process with mallopt in every worker ({settings}): {tuned}")
    rounds = max(len(rs) for rs in runs.values())
    order = "" if rounds == 1 or len(runs) == 1 else ", order reversed every other round"
    memory = ", ".join(f"{name} {max(r.peak_rss for r in rs) / GIB:.2f} GiB" for name, rs in runs.items())
    lines.append(f"workers: each in its own process, {rounds} round{'s' if rounds > 1 else ''}{order}; "
                 f"peak RSS {memory}")
    return lines


def print_header(title: str, runs: Dict[str, List[WorkerRun]]) -> None:
    print("\n".join(header_lines(title, runs)), flush=True)


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], align: Optional[str] = None) -> None:
    """A Markdown table; `align` has one 'l', 'r' or 'c' per column (default: first left, others right)."""
    align = align or "l" + "r" * (len(columns) - 1)
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(rule[a] for a in align) + "|")
    for row in rows:
        print("| " + " | ".join("-" if cell is None else str(cell) for cell in row) + " |")
    print(flush=True)


def ratio(numerator: Optional[float], denominator: Optional[float]) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"
