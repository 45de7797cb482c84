"""`make bench`: kd's engine against the plain PyTorch loop people write by hand, side by side.

Three cases, each with the same seeded weights, the same images (random pixels written in CIFAR-10's
on-disk format), batch size 128 and the same loss on both sides:

1. the PyTorch KD tutorial: DeepNN -> LightNN, CE + KD (T=2, CE 0.75 / KD 0.25), no augmentation;
2. ResNet-18 -> light6 with random crop + horizontal flip;
3. ResNet-18 trained alone with cross-entropy (a teacher's training), crop + flip.

The plain side is the tutorial's code: torchvision's CIFAR10 dataset (PIL images) -> ToTensor +
Normalize -> DataLoader(shuffle, 2 workers) -> teacher forward under no_grad every step ->
`loss.item()` every step. kd's side is kd's own code path: a config composed from kd's conf/ with
Hydra's compose API, `load_data`, the model catalogue, `build_loss` and `engine.fit`.

Each side runs in a fresh process of its own (sides.py says why). After a warm-up of both, the loops
alternate over several rounds (their order flips every round, so a slow drift of the shared machine
does not favour one side); the table gives each side's
images/s, the median kd/plain ratio with its min-max, and kd's achieved FLOP/s against the
device's measured matmul FLOP/s.

    python -m kd_cli.bench [--cases 1,2,3] [--rounds 5] [--images N] [--device auto]
"""

import argparse
import csv
import io
import logging
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_cli.atomic import atomic_write_text
from kd_cli.bench.cifar10_files import write_fake_cifar10
from kd_cli.bench.cost import OthersLoad, device_label, matmul_flops_per_s
from kd_cli.bench.sides import CASES, Case, KdSide, PlainSide, SideProcess
from kd_cli.bench.tutorial import BATCH_SIZE

log = logging.getLogger("kd_cli.bench")

CSV_COLUMNS = ["case", "kd_img_per_s", "plain_img_per_s", "ratio", "ratio_min", "ratio_max",
               "kd_flops_per_s", "peak_matmul_flops_per_s", "device"]


@dataclass
class CaseResult:
    case: Case
    kd: list[float]
    plain: list[float]
    kd_steps_only: list[float]
    load: list[float]  # the share of the CPU other processes used, per round
    flops_kd: float  # per trained image, as kd executes them
    flops_plain: float

    @property
    def ratios(self) -> list[float]:
        return [k / p for k, p in zip(self.kd, self.plain)]


def run_case(case: Case, images: int, rounds: int, device_name: str, workdir: Path) -> CaseResult:
    """Warm both sides up, then alternate their rounds, each side in its own process (see sides.py)."""
    root = write_fake_cifar10(workdir / f"case{case.key}", images)
    kd_rates, kd_steps, plain_rates, loads = [], [], [], []
    with SideProcess(KdSide, case, root, device_name) as kd, SideProcess(PlainSide, case, root, device_name) as plain:
        kd("warm_up")
        plain("warm_up")
        for r in range(rounds):
            order = (plain, kd) if r % 2 == 0 else (kd, plain)
            others, sides_cpu = OthersLoad(), 0.0
            for side in order:
                result, cpu_seconds = side("round")
                sides_cpu += cpu_seconds
                if side is kd:
                    kd_rates.append(result[0])
                    kd_steps.append(result[1])
                else:
                    plain_rates.append(result)
            loads.append(others.fraction(sides_cpu))
            log.info("case %s round %d/%d: kd %.0f img/s, plain %.1f img/s, ratio %.2fx (other processes used %.0f%% of the CPU)",
                     case.key, r + 1, rounds, kd_rates[-1], plain_rates[-1], kd_rates[-1] / plain_rates[-1], 100 * loads[-1])
        (flops_kd, flops_plain), _ = kd("flops")
    return CaseResult(case, kd_rates, plain_rates, kd_steps, loads, flops_kd=flops_kd, flops_plain=flops_plain)


def csv_rows(results: list[CaseResult], peak: float, device: str) -> list[dict]:
    rows = []
    for r in results:
        kd, plain = statistics.median(r.kd), statistics.median(r.plain)
        rows.append({
            "case": r.case.name, "kd_img_per_s": round(kd, 2), "plain_img_per_s": round(plain, 2),
            "ratio": round(statistics.median(r.ratios), 3), "ratio_min": round(min(r.ratios), 3),
            "ratio_max": round(max(r.ratios), 3), "kd_flops_per_s": round(r.flops_kd * kd),
            "peak_matmul_flops_per_s": round(peak), "device": device,
        })
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def student_dtype(device: torch.device) -> str:
    """The precision kd trains the student in with its default train.amp=auto: the peak to compare with."""
    from kd_cli.engine import cpu_has_native_bf16

    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "fp32"


def print_report(results: list[CaseResult], rows: list[dict], peaks: dict[str, float], device: torch.device,
                 label: str) -> None:
    from rich.console import Console
    from rich.table import Table

    on_gpu = device.type == "cuda"
    dtype = student_dtype(device)
    peak = peaks[dtype]
    table = Table(title=f"kd vs the plain loop, batch {BATCH_SIZE}, on {label}")
    for column in ("case", "kd img/s", "kd img/s, steps only", "plain img/s", "kd / plain (median)", "min-max",
                   "target", "kd GFLOP/s", "kd % of peak", "plain GFLOP/s", "others' CPU"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for r, row in zip(results, rows):
        case = r.case
        target_ratio = case.gpu_target if on_gpu else case.cpu_target
        checks = []
        if target_ratio:
            checks.append((f">= {target_ratio:g}x", row["ratio"] >= target_ratio))
        if on_gpu and case.gpu_peak_fraction:
            checks.append((f">= {case.gpu_peak_fraction:.0%} of peak", row["kd_flops_per_s"] >= case.gpu_peak_fraction * peak))
        target = ", ".join(f"{text} {'met' if ok else 'MISSED'}" for text, ok in checks) or "-"
        table.add_row(
            case.name, f"{row['kd_img_per_s']:,.0f}", f"{statistics.median(r.kd_steps_only):,.0f}",
            f"{row['plain_img_per_s']:,.1f}", f"{row['ratio']:.2f}x", f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}x",
            target, f"{row['kd_flops_per_s'] / 1e9:,.1f}", f"{100 * row['kd_flops_per_s'] / peak:.1f}%",
            f"{r.flops_plain * row['plain_img_per_s'] / 1e9:,.1f}", f"{100 * min(r.load):.0f}-{100 * max(r.load):.0f}%",
        )
    console = Console(width=None if sys.stdout.isatty() else 170)  # a log file gets every column unwrapped
    console.print(table)
    console.print("matmul peak measured now: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items())
                  + f"; the % column is against {dtype}, the precision kd trains the student in "
                  "(the plain loop trains in fp32).")
    busiest = max(max(r.load) for r in results)
    if device.type == "cpu" and busiest > 0.1:
        console.print(f"[bold]warning:[/bold] other processes used up to {100 * busiest:.0f}% of the CPU during the rounds. "
                      "Contention slows loops of many small operations (kd's cached steps: each multi-threaded "
                      "operation waits for a descheduled thread) far more than loops of a few large ones, so the "
                      "ratios are lower than on an idle machine.")
    console.print("kd img/s: training images / wall time of kd's whole fit (setup, teacher cache, per-epoch "
                  "evaluation included); steps only: kd's own train_img_per_s. Case 1's kd fit is 10 epochs "
                  "(the tutorial's), the plain loop's img/s is one epoch's (each of its epochs costs the same).")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kd_cli.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="1,2,3", help="comma-separated case numbers (default 1,2,3)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case, after a warm-up (default 5)")
    parser.add_argument("--images", default=None,
                        help="training images per round: one number for every case, or one per case "
                             f"(default {','.join(str(c.images) for c in CASES.values())})")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/bench.csv"), help="the csv to write")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown or not keys:
        parser.error(f"--cases takes numbers among {', '.join(CASES)}, got {args.cases!r}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    sizes = [int(v) for v in args.images.split(",")] if args.images else [CASES[k].images for k in keys]
    if len(sizes) == 1:
        sizes *= len(keys)
    if len(sizes) != len(keys) or min(sizes) < 2:
        parser.error("--images takes one number >= 2, or one per case")
    args.plan = list(zip([CASES[k] for k in keys], sizes))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kd_cli").setLevel(logging.INFO)
    from kd_cli.engine import resolve_device

    device = resolve_device(args.device)
    label = device_label(device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {k: matmul_flops_per_s(device, d) for k, d in dtypes.items()}
    log.info("device %s; matmul peak %s", label, ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()))
    results = []
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as workdir:
        for case, images in args.plan:
            log.info("case %s (%s): %d images per round, %d rounds", case.key, case.name, images, args.rounds)
            results.append(run_case(case, images, args.rounds, str(device), Path(workdir)))
    # The machine may be shared: the best of a measurement before and after the cases is the peak.
    peaks = {k: max(v, matmul_flops_per_s(device, dtypes[k])) for k, v in peaks.items()}
    peak = peaks[student_dtype(device)]
    rows = csv_rows(results, peak, label)
    write_csv(args.out, rows)
    print_report(results, rows, peaks, device, label)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
