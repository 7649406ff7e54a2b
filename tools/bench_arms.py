"""DiffExp against no DiffExp, measured: AlignProp and DDPO, each without DiffExp, with it, and with each
part alone, the same sample budget, several seeds paired by seed. Any model, reward and prompt sets.

    python tools/bench_arms.py --config toy-hidden                 # the mode-drop toy world (docs/toy_hidden.md)
    python tools/bench_arms.py --config toy                        # the neutral toy world (docs/toy_world.md)
    python tools/bench_arms.py --pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 --reward aesthetic \\
        --prompts simple_animals --eval-prompts unseen_animals --epochs 100 --samples-per-epoch 64 --num-steps 50
        # the paper's Figure 3/4 setting (a GPU: about a day for 2 methods x 4 arms x 3 seeds)

Each run is the trainer itself (a subprocess, the command a user types) in OUTPUT/<method>/<arm>/seed<k>/.
Before the first run the script prints the comparison's sample budget (and, for a preset, how long the
whole comparison took on a 2-core CPU); after each method's first epoch, that method's run time, and
after each run, an estimate of the time left. An interrupted comparison resumes where it stopped: finished
runs are skipped, an interrupted one is continued with the trainer's --resume. Then, from the runs'
logs and held-out evaluation images: bench.md (per method and arm: final held-out reward, its gain, the
gain minus the same seed's baseline gain as mean ± s.e. over seeds, success rate first → last, samples
to reach --success-target, samples to reach the baseline's final reward, and the reward of the samples
trained on in the first sixth of the epochs: what exploration showed the learner) and bench.png (held-out reward
and success rate against samples, mean over seeds with a ± s.e. band). --report-only redraws them.

Success: the share of held-out images (fixed seeds, w_high, no DiffExp: the model as used after training)
whose --success-reward (e.g. toy-hidden, toy-compose) is above --success-threshold, re-scored from the
saved PNGs of every evaluation.
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
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parent.parent  # the project root
sys.path.insert(0, str(ROOT))  # `python tools/bench_arms.py` from anywhere imports the project's modules
ARMS = {  # DiffExp parts switched on: (a) CFG schedule, (b) prompt weighting
    "baseline": ["--no-cfg-schedule", "--no-prompt-weighting"],
    "diffexp": ["--cfg-schedule", "--prompt-weighting"],
    "cfg": ["--cfg-schedule", "--no-prompt-weighting"],
    "pw": ["--no-cfg-schedule", "--prompt-weighting"],
    # The field's practice (Flow-GRPO, DanceGRPO, DiffusionNFT): rollouts without CFG (w = 1 on every step, the
    # whole run), evaluation at w_high as every arm's. A setting of DiffExp's own flags: the schedule at t_sw 0.
    "cfgfree": ["--cfg-schedule", "--no-prompt-weighting", "--t-sw", "0", "--w-low", "1", "--explore-frac", "1"],
}


@dataclass
class Args:
    config: (
        Literal["toy", "toy-hidden", "toy-hidden-k10", "toy-hidden-krand", "toy-hidden-stuck", "toy-dropped"] | None
    ) = None
    """a preset comparison, any flag still overriding it (see PRESETS in this file)"""
    methods: tuple[str, ...] = ("alignprop", "ddpo")
    """trainers to compare: alignprop, ddpo"""
    arms: tuple[str, ...] = ("baseline", "diffexp", "cfg", "pw")
    """baseline (no DiffExp), diffexp (both parts), cfg (CFG schedule alone), pw (prompt weighting alone), cfgfree (w = 1 on every training rollout step, the whole run; w_high in evaluation)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds, each run by every method and arm (pairs for the paired differences)"""
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """the base model (hub id, directory, or a shipped toy world)"""
    reward: str = "aesthetic"
    """the trainers' --reward"""
    reward_models: dict[str, str] = field(default_factory=dict)
    """the trainers' --reward-models KEY VALUE pairs"""
    prompts: str = "simple_animals"
    """training prompts"""
    eval_prompts: str = "unseen_animals"
    """held-out prompts (every evaluation: fixed seeds, w_high, no DiffExp)"""
    epochs: int = 100
    """epochs per run: the same sample budget for every arm"""
    samples_per_epoch: int = 64
    """samples per epoch (paper: 64)"""
    batch_size: int = 8
    """images per process per pass (AlignProp's --batch-size, DDPO's --sample-batch-size and --train-batch-size)"""
    num_steps: int = 50
    """denoising steps while fine-tuning and evaluating"""
    eval_every: int = 5
    """held-out evaluation every N epochs (the curves' points)"""
    eval_num: int = 16
    """held-out prompts evaluated"""
    key: str = "eval_reward_mean"
    """the logged quantity compared (eval_reward_mean: the held-out reward)"""
    success_reward: str | None = None
    """a reward name whose value above --success-threshold counts an evaluation image as a success (e.g. toy-hidden); None: no success columns"""
    success_threshold: float = 0.5
    """the --success-reward value above which an image is a success"""
    success_target: float = 0.5
    """the success rate the 'samples to reach' column asks for"""
    method_flags: tuple[str, ...] = ()
    """extra flags for one method, each 'METHOD: FLAGS', e.g. --method-flags 'ddpo: --lr 3e-3' 'alignprop: --lr 1e-3'"""
    extra: tyro.conf.UseAppendAction[list[str]] = field(default_factory=list)
    """more flags for every trainer, one token per --extra (a value starting with '-' needs '='): --extra=--w-low --extra=3"""
    output_dir: str = "runs/bench"
    """where the runs, bench.md and bench.png go"""
    report_only: bool = False
    """do not train: only rebuild bench.md and bench.png from the runs already there"""


# A preset: the defaults of a whole comparison; every flag still overrides it.
PRESETS = {
    # The neutral toy world: the toy scorer pays for what every sampling setting already produces.
    "toy": dict(pretrained="toy", reward="pickscore", reward_models={"pickscore_model": "toy-scorer", "pickscore_processor": "toy-scorer"},
                prompts="toy_two_shapes", eval_prompts="toy_unseen", epochs=30, samples_per_epoch=16, num_steps=10,
                output_dir="runs/bench_toy"),
    # The mode-drop world: the rewarded mode (the shape in purple) is common at w = 1 and rare at w_high.
    # Evaluation: 8 fixed-seed images per prompt (toy_hidden_eval repeats each prompt 8 times). DDPO at lr 3e-3:
    # at its default 3e-4 its baseline did not move in 480 samples (pilot, docs/toy_hidden.md).
    "toy-hidden": dict(pretrained="toy-hidden", reward="toy-hidden", prompts="toy_hidden", eval_prompts="toy_hidden_eval",
                       eval_num=32, epochs=30, samples_per_epoch=16, num_steps=10, success_reward="toy-hidden",
                       seeds=(0, 1, 2, 3, 4), method_flags=("ddpo: --lr 3e-3",), output_dir="runs/bench_hidden"),
    # Round 2 on the mode-drop world: 32 evaluation images per shape (toy_hidden_eval128), the field's CFG-free
    # rollouts as an arm. AlignProp with the gradient through all 10 steps (K = 10), where the CFG schedule acts,
    # or through K ~ U{1..10}; DDPO at the paper's lr 3e-4 (the stuck learner) for 960 samples.
    "toy-hidden-k10": dict(pretrained="toy-hidden", reward="toy-hidden", prompts="toy_hidden", eval_prompts="toy_hidden_eval128",
                           eval_num=128, epochs=30, samples_per_epoch=16, num_steps=10, success_reward="toy-hidden",
                           seeds=(0, 1, 2, 3, 4), methods=("alignprop",), arms=("baseline", "cfg", "diffexp", "cfgfree"),
                           method_flags=("alignprop: --backprop-steps 10",), output_dir="runs/bench_hidden_k10"),
    "toy-hidden-krand": dict(pretrained="toy-hidden", reward="toy-hidden", prompts="toy_hidden", eval_prompts="toy_hidden_eval128",
                             eval_num=128, epochs=30, samples_per_epoch=16, num_steps=10, success_reward="toy-hidden",
                             seeds=(0, 1, 2, 3, 4), methods=("alignprop",), arms=("baseline", "cfg", "diffexp", "cfgfree"),
                             method_flags=("alignprop: --backprop-steps 10 --backprop-steps-random",), output_dir="runs/bench_hidden_krand"),
    "toy-hidden-stuck": dict(pretrained="toy-hidden", reward="toy-hidden", prompts="toy_hidden", eval_prompts="toy_hidden_eval128",
                             eval_num=128, epochs=60, samples_per_epoch=16, num_steps=10, success_reward="toy-hidden",
                             seeds=(0, 1, 2, 3, 4), methods=("ddpo",), arms=("baseline", "cfg", "diffexp", "cfgfree"),
                             method_flags=("ddpo: --lr 3e-4",), output_dir="runs/bench_hidden_stuck"),
    # The dropped-word world: 'A and B' often shows A alone, emphasising B's word brings it back;
    # success = both objects (toy-compose).
    "toy-dropped": dict(pretrained="toy-dropped", reward="toy-compose", prompts="toy_dropped", eval_prompts="toy_dropped_eval",
                        eval_num=32, epochs=30, samples_per_epoch=16, num_steps=10, success_reward="toy-compose",
                        seeds=(0, 1, 2, 3, 4), method_flags=("ddpo: --lr 3e-3",), output_dir="runs/bench_dropped"),
}  # fmt: skip
# How long each preset's whole comparison took here (printed before it starts): a shared 2-core CPU.
PRESET_TIME = {
    "toy": "about 0.8 h on a 2-core CPU (24 runs: AlignProp ~80 s, DDPO ~160 s a run; measured 2026-11-23)",
    "toy-hidden": "about 1.4 h on a 2-core CPU (40 runs: AlignProp 75-100 s, DDPO 160-200 s a run; measured "
    "2026-12-03 with toy-dropped beside it, one thread each: both finished in that time)",
    "toy-hidden-k10": "about 2.7 h on a 2-core CPU (20 AlignProp runs at K = 10, 465-510 s a run at one thread beside "
    "another comparison; measured 2026-12-06)",
    "toy-hidden-krand": "about 1.5 h on a 2-core CPU (20 AlignProp runs at K ~ U{1..10}, 210-360 s a run at one thread "
    "beside another comparison; measured 2026-12-06)",
    "toy-hidden-stuck": "about 3.8 h on a 2-core CPU (20 DDPO runs of 960 samples, 525-870 s a run at one thread beside "
    "another comparison; measured 2026-12-06)",
    "toy-dropped": "about 1.5 h on a 2-core CPU (40 runs: AlignProp ~90 s, DDPO ~180 s a run; measured 2026-12-03)",
}


def command(args: Args, method: str, arm: str, seed: int, out: Path) -> list[str]:
    """The trainer's command line for one run."""
    cmd = [sys.executable, str(ROOT / f"train_{method}.py"), "--pretrained", args.pretrained, "--reward", args.reward]
    if args.reward_models:  # one flag with every KEY VALUE pair (a repeated flag would replace the earlier pairs)
        cmd += ["--reward-models", *[x for kv in args.reward_models.items() for x in kv]]
    cmd += ["--prompts", args.prompts, "--eval-prompts", args.eval_prompts, "--num-steps", str(args.num_steps)]
    cmd += ["--num-epochs", str(args.epochs), "--samples-per-epoch", str(args.samples_per_epoch)]
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
    batch = min(args.batch_size, args.samples_per_epoch)
    accumulation = ["--gradient-accumulation-steps", str(args.samples_per_epoch // batch)]
    if method == "alignprop":
        cmd += ["--batch-size", str(batch), *accumulation]
    else:
        cmd += ["--sample-batch-size", str(batch), "--train-batch-size", str(batch), *accumulation]
    own = [flags for m, _, flags in (f.partition(":") for f in args.method_flags) if m.strip() == method]
    return cmd + ARMS[arm] + " ".join(own).split() + list(args.extra)


def read_log(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def finished(run: Path, epochs: int) -> bool:
    return any(r.get("epoch") == epochs - 1 for r in read_log(run))


def curve(run: Path, key: str) -> list[tuple[int, float]]:
    return [(r["samples"], r[key]) for r in read_log(run) if r.get(key) is not None]


# ---------------------------------------------------------------------------------------------
# Running the comparison.


def resume_flag(run: Path) -> list[str]:
    """--resume for an interrupted run (one stopped before its first checkpoint restarts there); nothing for a
    new one, or for a folder with nothing to resume (a run killed while starting leaves only its .lock), which
    the trainer would refuse with --resume."""
    import rundir

    return ["--resume"] if rundir.run_outputs(run) else []  # () for a folder that does not exist, too


def run_all(args: Args, out: Path):
    """Every (method, arm, seed) run not yet finished, in order; an interrupted one continues with --resume."""
    todo = [
        (m, a, s)
        for m in args.methods
        for a in args.arms
        for s in args.seeds
        if not finished(out / m / a / f"seed{s}", args.epochs)
    ]
    total = len(args.methods) * len(args.arms) * len(args.seeds)
    print(f"{total} runs x {args.epochs} epochs x {args.samples_per_epoch} samples = {total * args.epochs * args.samples_per_epoch:,} "
          f"training samples ({args.samples_per_epoch * args.epochs:,} a run); {len(todo)} runs to go", flush=True)  # fmt: skip
    if args.config in PRESET_TIME and todo:
        preset = Args(**PRESETS[args.config])  # the preset as it stands, to say whether this run is all of it
        whole = (args.methods, args.arms, args.seeds) == (preset.methods, preset.arms, preset.seeds)
        print(f"--config {args.config}{'' if whole else ' (the whole preset; this run is a part of it)'}: "
              f"{PRESET_TIME[args.config]}", flush=True)  # fmt: skip
    seconds = {}  # method -> durations of the runs finished in this invocation (for the estimate)
    for i, (method, arm, seed) in enumerate(todo):
        run = out / method / arm / f"seed{seed}"
        cmd = command(args, method, arm, seed, run) + resume_flag(run)
        print(f"[{i + 1}/{len(todo)}] {method} {arm} seed {seed}", flush=True)
        # Passive OpenMP waiting: on a shared CPU, spinning threads made a run several times slower.
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        t0 = time.time()
        estimated = method in seconds
        with open(out / "last_run_output.txt", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
            while proc.poll() is None:
                time.sleep(1)
                if not estimated and (first := next((r for r in read_log(run) if r.get("epoch", -1) >= 0), None)):
                    # A method's first run: its first epoch times the epochs (evaluations come on top).
                    print(f"  first epoch: {first['seconds']:.1f} s ({first['sec_per_sample']:.3f} s/sample): "
                          f"one {method} run takes about {first['seconds'] * args.epochs / 60:.0f} min plus evaluations",
                          flush=True)  # fmt: skip
                    estimated = True
        if proc.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}; its output: {out / 'last_run_output.txt'}")
        seconds.setdefault(method, []).append(time.time() - t0)
        rest = todo[i + 1 :]
        if rest:
            # Each method's mean run time so far; a method not yet run is guessed at the slowest one seen.
            guess = max(statistics.mean(v) for v in seconds.values())
            left = sum(statistics.mean(seconds[m]) if m in seconds else guess for m, _, _ in rest)
            when = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.0f} min"
            print(f"  done in {time.time() - t0:.0f} s; runs left: {len(rest)}, about {when}", flush=True)
        else:
            print(f"  done in {time.time() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------
# The report.


@functools.cache
def success_scorer(name: str):
    """The success reward, loaded once for every run the report re-scores."""
    import rewards

    return rewards.load_reward(name, device="cpu")


def success_curve(run: Path, name: str, threshold: float) -> list[tuple[int, float]]:
    """(samples, share of held-out images with reward > threshold) at every evaluation of a run, re-scored
    from the saved PNGs (8-bit, so within ~1e-3 of the float scores); cached in success_<name>.json."""
    cache = run / f"success_{name.replace('/', '_')}_{threshold:g}.json"
    if cache.is_file():
        return [tuple(p) for p in json.loads(cache.read_text())]
    import torch
    from torchvision.io import read_image

    points = []
    for r in read_log(run):
        folder = run / "eval" / ("initial" if r["epoch"] < 0 else f"epoch_{r['epoch']:04d}")
        if "eval_reward_mean" not in r or not (folder / "prompts.json").is_file():
            continue
        prompts = json.loads((folder / "prompts.json").read_text())["prompts"]
        images = torch.stack([read_image(str(folder / f"{i:03d}.png"))[:3].float() / 255 for i in range(len(prompts))])
        with torch.no_grad():
            scores, _ = success_scorer(name)(images, prompts)
        points.append((r["samples"], (scores > threshold).float().mean().item()))
    cache.write_text(json.dumps(points))
    return points


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float]]:
    """(samples, mean, standard error) over seeds at the sample counts every seed logged."""
    common = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves else []
    out = []
    for s in common:
        vals = [dict(c)[s] for c in curves]
        out.append((s, statistics.fmean(vals), sem(vals)))
    return out


def sem(values: list[float]) -> float:
    """The standard error of the mean over seeds (0 for a single seed)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def mean_se(mean: float, se: float, n: int, fmt: str = ".3f") -> str:
    """mean ± s.e. over n seeds; one seed has no spread, which is said rather than shown as ± 0."""
    return f"{mean:{fmt}} ± {se:.3f}" if n > 1 else f"{mean:{fmt}} (1 seed: no spread)"


def paired(values: dict, base: dict) -> str:
    """mean ± s.e. of value − the same seed's baseline value, over the seeds both have."""
    diffs = [values[s] - base[s] for s in values if s in base]
    return f"{statistics.fmean(diffs):+.3f} ± {sem(diffs):.3f}" if len(diffs) > 1 else "—"


def eval_own_se(run: Path, name: str | None, threshold: float) -> tuple[float, float | None] | None:
    """The last evaluation's own standard error, from its images: of the mean reward (std / sqrt(n)), and of
    the success rate (sqrt(p (1 - p) / n), from the success reward's scores) when one is given. None when the
    run kept no evaluation images."""
    last = max((r for r in read_log(run) if "eval_reward_mean" in r), key=lambda r: r["epoch"])
    folder = run / "eval" / ("initial" if last["epoch"] < 0 else f"epoch_{last['epoch']:04d}")
    scores = (
        json.loads((folder / "prompts.json").read_text()).get("reward") if (folder / "prompts.json").is_file() else None
    )
    if not scores:
        return None
    reward_se = statistics.stdev(scores) / len(scores) ** 0.5 if len(scores) > 1 else 0.0
    if name is None:
        return reward_se, None
    p = dict(success_curve(run, name, threshold))[last["samples"]]
    return reward_se, (p * (1 - p) / len(scores)) ** 0.5


def exploration_split(run: Path, key: str) -> tuple[float, float] | None:
    """(held-out gain from the start to the last evaluation made while exploring, gain from there to the end):
    what the held-out reward did during DiffExp's exploration window and after it (the same epochs for every
    arm, whether or not it explores). None when no evaluation fell inside the window."""
    log = read_log(run)
    points = [r for r in log if r.get(key) is not None]
    inside = [r for r in points if r["epoch"] >= 0 and r.get("exploring")]
    if not points or not inside:
        return None
    start, mid, end = points[0][key], inside[-1][key], points[-1][key]
    return mid - start, end - mid


def early_epochs(args: Args) -> int:
    """The first sixth of the epochs: the 'what did sampling show' window (the model has barely moved)."""
    return max(1, args.epochs // 6)


def report(args: Args):
    out = Path(args.output_dir)
    succ = args.success_reward
    header = ["method", "arm", "seeds", f"final {args.key} (mean ± s.e.)", "gain over its start (mean ± s.e.)",
              "gain − baseline's gain, same seed (mean ± s.e.)", "samples to reach the baseline's final",
              f"reward of the samples trained on, first {early_epochs(args)} epochs (mean ± s.e.)",
              "held-out gain while exploring / after (mean ± s.e.)", "final evaluation's own s.e. (reward; success)"]  # fmt: skip
    if succ:
        header += [f"success ({succ} > {args.success_threshold:g}), first → last", "success − baseline's, same seed (mean ± s.e.)",
                   f"samples to reach {args.success_target:.0%} success"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if succ else 1
    fig, axes = plt.subplots(rows, len(args.methods), figsize=(5 * len(args.methods), 4 * rows), squeeze=False)
    for col, method in enumerate(args.methods):
        # Only finished runs count: a partial curve would skew the mean.
        runs = {arm: {s: out / method / arm / f"seed{s}" for s in args.seeds if finished(out / method / arm / f"seed{s}", args.epochs)}
                for arm in args.arms}  # fmt: skip
        rewards = {arm: {s: curve(run, args.key) for s, run in by_seed.items()} for arm, by_seed in runs.items()}
        success = {arm: {s: success_curve(run, succ, args.success_threshold) for s, run in by_seed.items()} for arm, by_seed in runs.items()} if succ else {}  # fmt: skip
        base = mean_curve(list(rewards.get("baseline", {}).values()))
        base_final = base[-1][1] if base and base[-1][1] > base[0][1] else None  # only if the baseline gained
        # Each seed evaluates its own fixed noise, so seeds start apart: gains (final − start) are paired
        # within a seed, and so is the comparison with the baseline's gain of the same seed.
        gains = {arm: {s: c[-1][1] - c[0][1] for s, c in by_seed.items() if c} for arm, by_seed in rewards.items()}
        finals = {arm: {s: c[-1][1] for s, c in by_seed.items() if c} for arm, by_seed in success.items()}
        for arm in args.arms:
            mc = mean_curve([c for c in rewards[arm].values() if c])
            if not mc:
                continue
            g = list(gains[arm].values())
            se = sem(g)
            reach = (
                next((s for s, m, _ in mc if m >= base_final), "not reached")
                if base_final is not None
                else "— (baseline did not gain)"
            )
            # What exploration showed the learner: the training samples' own reward before the model moved much.
            early = [statistics.fmean(v) for run in runs[arm].values()
                     if (v := [r["reward_mean"] for r in read_log(run) if 0 <= r.get("epoch", -1) < early_epochs(args) and "reward_mean" in r])]  # fmt: skip
            seen = mean_se(statistics.fmean(early), sem(early), len(early)) if early else "—"
            # The held-out reward inside DiffExp's exploration window and after it, separately: does it move only
            # once exploration stops?
            split = [x for run in runs[arm].values() if (x := exploration_split(run, args.key))]
            window = (
                " / ".join(mean_se(statistics.fmean(v), sem(v), len(v), "+.3f") for v in zip(*split)) if split else "—"
            )
            # How precisely one evaluation measures a model (its images' spread), beside the spread over seeds.
            own = [x for run in runs[arm].values() if (x := eval_own_se(run, succ, args.success_threshold))]
            own_se = (f"{statistics.fmean(r for r, _ in own):.3f}" + (f"; {statistics.fmean(p for _, p in own):.1%}" if succ else "")
                      if own else "—")  # fmt: skip
            cells = [method, arm, str(len(g)), mean_se(mc[-1][1], mc[-1][2], len(g)), mean_se(statistics.fmean(g), se, len(g), "+.3f"),
                     paired(gains[arm], gains["baseline"]) if arm != "baseline" and "baseline" in gains else "—", str(reach),
                     seen, window, own_se]  # fmt: skip
            xs, ms, ses = zip(*mc)
            axes[0][col].plot(xs, ms, marker="o", markersize=3, label=arm)
            axes[0][col].fill_between(
                xs, [m - e for m, e in zip(ms, ses)], [m + e for m, e in zip(ms, ses)], alpha=0.15
            )
            if succ:
                sc = mean_curve([c for c in success[arm].values() if c])
                first_last = f"{sc[0][1]:.1%} → {sc[-1][1]:.1%}" if sc else "—"
                target = next((s for s, m, _ in sc if m >= args.success_target), "not reached")
                cells += [
                    first_last,
                    paired(finals[arm], finals["baseline"]) if arm != "baseline" and "baseline" in finals else "—",
                    str(target),
                ]
                if sc:
                    xs, ms, ses = zip(*sc)
                    axes[1][col].plot(xs, ms, marker="o", markersize=3, label=arm)
                    axes[1][col].fill_between(
                        xs, [m - e for m, e in zip(ms, ses)], [m + e for m, e in zip(ms, ses)], alpha=0.15
                    )
            lines.append("| " + " | ".join(cells) + " |")
        axes[0][col].set_title(f"{method}: held-out reward")
        axes[0][col].set_ylabel(args.key)
        if succ:
            axes[1][col].set_title(f"{method}: held-out success ({succ} > {args.success_threshold:g})")
            axes[1][col].set_ylabel("share of held-out images")
        for ax in axes[:, col]:
            ax.set_xlabel("samples seen in training")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"model {args.pretrained}, reward {args.reward}: mean over seeds ± s.e.", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    table = "\n".join(lines)
    (out / "bench.md").write_text(table + "\n")
    print(table)


def main(args: Args):
    out = Path(args.output_dir)
    bad = [m for m in args.methods if m not in ("alignprop", "ddpo")] + [a for a in args.arms if a not in ARMS]
    if bad:
        sys.exit(f"error: unknown method/arm {bad}; methods: alignprop ddpo; arms: {' '.join(ARMS)}")
    if any(f.partition(":")[0].strip() not in ("alignprop", "ddpo") for f in args.method_flags):
        sys.exit(
            f"error: --method-flags takes 'METHOD: FLAGS' with METHOD alignprop or ddpo, got {list(args.method_flags)}"
        )
    if "baseline" not in args.arms:
        sys.exit("error: --arms must include baseline (every comparison is paired with the same seed's baseline)")
    if args.success_reward is not None:
        import rewards

        try:
            rewards.parse_reward_spec(args.success_reward, "--success-reward")
        except ValueError as e:
            sys.exit(f"error: {e}")
    runs = [out / m / a / f"seed{s}" for m in args.methods for a in args.arms for s in args.seeds]
    if args.report_only and not any(finished(run, args.epochs) for run in runs):
        sys.exit(
            f"error: --report-only: {out} holds no finished run of these --methods, --arms, --seeds and --epochs {args.epochs}: run without --report-only first"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_all(args, out)
    report(args)


def cli(argv: list[str] | None = None) -> Args:
    """The command line, with `--config NAME` presets (their values become the defaults)."""
    import runs

    try:
        return runs.parse_args_with_presets(Args, PRESETS, argv)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(cli())
