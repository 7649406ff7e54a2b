"""DiffExp benchmark in the offline toy world: AlignProp and DDPO, each without and with DiffExp (and
each DiffExp part alone), same sample budget, several seeds, on the toy two-shape prompts.

    python bench_toy.py                                   # 2 methods x 4 arms x 3 seeds (long on CPU)
    python bench_toy.py --methods alignprop --arms baseline diffexp --seeds 0 --epochs 4   # a quick look

Each run is the trainer itself (a subprocess, the same command a user types), writing to
OUTPUT/<method>/<arm>/seed<k>/; a finished run is not repeated. Then, from the runs' log.jsonl:
bench.png (held-out reward against cumulative samples, mean over seeds) and bench.md (final reward
mean +- std over seeds; samples each arm needs to reach the baseline's final mean reward).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent  # the project root
sys.path.insert(0, str(ROOT))  # `python tools/bench_toy.py` from anywhere imports the project's modules
ARMS = {  # DiffExp parts switched on: (a) CFG schedule, (b) prompt weighting
    "baseline": ["--no-cfg-schedule", "--no-prompt-weighting"],
    "diffexp": ["--cfg-schedule", "--prompt-weighting"],
    "cfg": ["--cfg-schedule", "--no-prompt-weighting"],
    "pw": ["--no-cfg-schedule", "--prompt-weighting"],
}


@dataclass
class Args:
    methods: tuple[str, ...] = ("alignprop", "ddpo")
    """trainers to compare: alignprop, ddpo"""
    arms: tuple[str, ...] = ("baseline", "diffexp", "cfg", "pw")
    """baseline (no DiffExp), diffexp (both parts), cfg (CFG schedule alone), pw (prompt weighting alone)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 30
    """epochs per run (the same sample budget for every arm)"""
    samples_per_epoch: int = 16
    num_steps: int = 10
    """DDIM steps while fine-tuning and evaluating"""
    prompts: str = "toy_two_shapes"
    eval_prompts: str = "toy_unseen"
    eval_every: int = 5
    eval_num: int = 16
    reward: str = "pickscore"
    """the trainers' --reward ('pickscore' is the toy scorer; 'pickscore:1,toy-compose:0' also logs the
    compositional reward of the held-out images as eval_reward/toy-compose without training on it)"""
    key: str = "eval_reward_mean"
    """the logged quantity compared (eval_reward_mean: held-out prompts, fixed seeds, no DiffExp)"""
    output_dir: str = "runs/bench_toy"
    extra: tyro.conf.UseAppendAction[list[str]] = field(default_factory=list)
    """more flags for every trainer, one token per --extra (a value starting with '-' needs '='): --extra=--w-low --extra=3"""
    report_only: bool = False
    """do not train: only rebuild bench.png and bench.md from the runs already there"""


def command(args: Args, method: str, arm: str, seed: int, out: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / f"train_{method}.py"), "--pretrained", "toy", "--reward", args.reward]
    cmd += ["--reward-models", "pickscore_model", "toy-scorer", "pickscore_processor", "toy-scorer"]
    cmd += ["--prompts", args.prompts, "--eval-prompts", args.eval_prompts, "--num-steps", str(args.num_steps)]
    cmd += [
        "--num-epochs",
        str(args.epochs),
        "--samples-per-epoch",
        str(args.samples_per_epoch),
        "--mixed-precision",
        "no",
    ]
    cmd += [
        "--eval-every",
        str(args.eval_every),
        "--eval-num",
        str(args.eval_num),
        "--seed",
        str(seed),
        "--output-dir",
        str(out),
    ]
    batch = min(8, args.samples_per_epoch)
    if method == "alignprop":
        cmd += ["--batch-size", str(batch), "--gradient-accumulation-steps", str(args.samples_per_epoch // batch)]
    else:
        cmd += [
            "--sample-batch-size",
            str(batch),
            "--train-batch-size",
            str(batch),
            "--gradient-accumulation-steps",
            str(args.samples_per_epoch // batch),
        ]
    return cmd + ARMS[arm] + list(args.extra)


def _read_curve(run: Path, key: str) -> list[tuple[int, float]]:
    log = run / "log.jsonl"
    if not log.is_file():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [(r["samples"], r[key]) for r in rows if r.get(key) is not None]


def finished(run: Path, epochs: int) -> bool:
    log = run / "log.jsonl"
    return log.is_file() and any(
        json.loads(line).get("epoch") == epochs - 1 for line in log.read_text().splitlines() if line.strip()
    )


@functools.cache
def toy_compose():
    """The toy-compose reward, loaded once for every run the report re-scores."""
    import rewards

    return rewards.load_reward("toy-compose", device="cpu")


def success_rates(run: Path, epochs: int) -> tuple[float, float] | None:
    """Share of held-out images the compositional reward calls a success (toy-compose > 0.5), at the
    first evaluation and at the last: the run's eval/initial and eval/epoch_<last> images, re-scored
    from their PNG files (8-bit, so within ~1e-3 of the logged float scores). Cached in success.json."""
    cache = run / "success.json"
    if cache.is_file():
        return tuple(json.loads(cache.read_text()))
    dirs = [run / "eval" / "initial", run / "eval" / f"epoch_{epochs - 1:04d}"]
    if not all((d / "prompts.json").is_file() for d in dirs):
        return None
    import torch
    from torchvision.io import read_image

    rates = []
    for d in dirs:
        prompts = json.loads((d / "prompts.json").read_text())["prompts"]
        images = torch.stack([read_image(str(d / f"{i:03d}.png")).float() / 255 for i in range(len(prompts))])
        with torch.no_grad():
            scores, _ = toy_compose()(images[:, :3], prompts)
        rates.append((scores > 0.5).float().mean().item())
    cache.write_text(json.dumps(rates))
    return tuple(rates)


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float]]:
    """(samples, mean, std) over seeds at the sample counts every seed logged."""
    common = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves else []
    out = []
    for s in common:
        vals = [dict(c)[s] for c in curves]
        out.append((s, statistics.fmean(vals), statistics.pstdev(vals)))
    return out


def report(args: Args):
    out = Path(args.output_dir)

    def read_curve(run: Path, key: str):  # only finished runs count: a partial curve would skew the mean
        return _read_curve(run, key) if finished(run, args.epochs) else []

    lines = [
        f"| method | arm | seeds | final {args.key} (mean ± std) | gain over its own start (mean ± std) | gain − baseline's gain, same seed (mean ± s.e.) | samples to reach the baseline's final | toy-compose success on {args.eval_prompts}, first → last evaluation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.methods), figsize=(5 * len(args.methods), 4), squeeze=False)
    for ax, method in zip(axes[0], args.methods):
        runs = {
            arm: {s: c for s in args.seeds if (c := read_curve(out / method / arm / f"seed{s}", args.key))}
            for arm in args.arms
        }
        curves = {arm: mean_curve(list(by_seed.values())) for arm, by_seed in runs.items()}
        base = curves.get("baseline") or []
        # "Samples to reach the baseline's final" only means something when the baseline gained.
        base_final = base[-1][1] if base and base[-1][1] > base[0][1] else None
        # Each seed evaluates its own fixed noise, so seeds start apart; gains (final - start) are
        # paired within a seed, and so is the comparison with the baseline's gain of the same seed.
        gains = {arm: {s: c[-1][1] - c[0][1] for s, c in by_seed.items()} for arm, by_seed in runs.items()}
        for arm, curve in curves.items():
            if not curve:
                continue
            g = list(gains[arm].values())
            g_mean = statistics.fmean(g)
            diffs = [gains[arm][s] - gains["baseline"][s] for s in gains[arm] if s in gains.get("baseline", {})]
            paired = (
                f"{statistics.fmean(diffs):+.3f} ± {statistics.stdev(diffs) / len(diffs) ** 0.5:.3f}"
                if arm != "baseline" and len(diffs) > 1
                else "—"
            )
            rates = [
                r for s in runs[arm] if (r := success_rates(out / method / arm / f"seed{s}", args.epochs)) is not None
            ]
            success = (
                f"{100 * statistics.fmean(a for a, _ in rates):.1f}% → {100 * statistics.fmean(b for _, b in rates):.1f}%"
                f" ({len(rates)} × {args.eval_num} images)"
                if rates
                else "—"
            )
            reach = (
                next((s for s, m, _ in curve if m >= base_final), "not reached")
                if base_final is not None
                else "— (baseline did not gain)"
            )
            lines.append(
                f"| {method} | {arm} | {len(g)} | {curve[-1][1]:.3f} ± {curve[-1][2]:.3f} | {g_mean:+.3f} ± {statistics.pstdev(g):.3f} | {paired} | {reach} | {success} |"
            )
            xs, ms, sd = zip(*curve)
            ax.plot(xs, ms, marker="o", label=arm)
            ax.fill_between(xs, [m - s for m, s in zip(ms, sd)], [m + s for m, s in zip(ms, sd)], alpha=0.15)
        ax.set_title(method)
        ax.set_xlabel("number of samples")
        ax.set_ylabel(args.key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    table = "\n".join(lines)
    (out / "bench.md").write_text(table + "\n")
    print(table)


def main(args: Args):
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    bad = [m for m in args.methods if m not in ("alignprop", "ddpo")] + [a for a in args.arms if a not in ARMS]
    if bad:
        sys.exit(f"error: unknown method/arm {bad}; methods: alignprop ddpo; arms: {' '.join(ARMS)}")
    for method in [] if args.report_only else args.methods:
        for arm in args.arms:
            for seed in args.seeds:
                run = out / method / arm / f"seed{seed}"
                if finished(run, args.epochs):
                    continue
                t0 = time.time()
                print(f"{method} {arm} seed {seed} ...", flush=True)
                # --resume continues an interrupted run; a fresh directory starts from scratch.
                cmd = command(args, method, arm, seed, run) + (["--resume"] if (run / "checkpoints").is_dir() else [])
                # Passive OpenMP waiting: on a shared CPU, spinning threads made a run several times slower.
                env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
                run.mkdir(parents=True, exist_ok=True)
                (run / "stderr.txt").write_text(proc.stderr[-20000:])
                if proc.returncode != 0:
                    sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}; see {run / 'stderr.txt'}")
                print(f"  done in {time.time() - t0:.0f} s", flush=True)
    report(args)


if __name__ == "__main__":
    main(tyro.cli(Args))
