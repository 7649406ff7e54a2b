"""DDPO with DiffExp: fine-tune Stable Diffusion's LoRA weights with a clipped policy gradient
(Black et al. 2024), exploring with DiffExp.

    python train_ddpo.py --reward aesthetic --t-sw 0.8
    python train_ddpo.py --config toy                       # the offline toy world, minutes on a CPU
    accelerate launch --num_processes 8 train_ddpo.py --reward jpeg

Per epoch (all in `main`, top to bottom): sample trajectories with the DiffExp CFG schedule and
randomly weighted prompts (while exploring), storing for every step the latents, the log-prob, the
guidance scale and the conditioning actually used; score the images; turn rewards into advantages;
then `inner_epochs` PPO passes over the trajectories, recomputing each step's log-prob under exactly
the conditions that sampled it (the consistency rule: the ratio is 1 before the first update).
The run's plumbing (checks, output directory, resume, evaluation, logging, checkpoints) is runs.py.
"""

from __future__ import annotations

import rundir  # first, and light: Ctrl-C while the rest imports (seconds) ends in one line, not a traceback

if __name__ == "__main__":
    rundir.on_ctrl_c(lambda: "interrupted while starting: nothing was written")

import functools
import math
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

import rewards as rewards_lib
import runs
from explore import DiffExpConfig


@dataclass
class Args:
    config: Literal["toy"] | None = None
    """a preset filling in a whole setting, any flag still overriding it: 'toy' = the shipped offline toy world (--pretrained toy, pickscore with the toy-scorer, toy_two_shapes / toy_unseen prompts, 10 steps, fp32, 30 epochs x 16 samples, output runs/toy-ddpo)"""
    num_epochs: int = 100
    """epochs: each samples --samples-per-epoch trajectories, then makes --inner-epochs PPO passes over them"""
    samples_per_epoch: int = 64
    """trajectories per epoch across all processes (paper: 64)"""
    sample_batch_size: int = 8
    """trajectories sampled at once per process"""
    num_steps: int = 50
    """DDIM denoising steps"""
    eta: float | None = None
    """sampling noise in (0, 1] (the policy needs a density): DDIM's eta (None: 1.0), or on SD3 the SDE's noise level (None: 0.7, Flow-GRPO's)"""
    train_batch_size: int = 4
    """trajectories per training forward/backward pass per process"""
    gradient_accumulation_steps: int = 4
    """training batches per optimizer step (each already accumulates over its timesteps)"""
    inner_epochs: int = 1
    """PPO passes over each epoch's trajectories"""
    timestep_fraction: float = 1.0
    """fraction of the denoising steps trained on, a random subset per trajectory"""
    clip_range: float = 1e-4
    """PPO ratio clip epsilon (paper: 1e-4)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to [-adv_clip_max, adv_clip_max]"""
    per_prompt_stat_tracking: bool = True
    """normalise rewards per prompt with a running buffer (else by the batch; --group-size replaces both)"""
    stat_buffer_size: int = 32
    """rewards kept per prompt for its mean/std"""
    stat_min_count: int = 16
    """below this many rewards for a prompt, normalise by the batch's mean/std (at most --stat-buffer-size)"""
    group_size: int = 0
    """GRPO: each epoch draws --samples-per-epoch / k prompts and samples each k times; a sample's advantage is (r - its group's mean) / (its group's std + 1e-4), instead of the per-prompt tracker's or the batch's; 0: off"""
    kl_beta: float = 0.0
    """weight of a KL penalty to the reference policy (the base model: LoRA adapters off), ||mean - mean_ref||^2 / (2 sigma^2) averaged over C*H*W per trained (sample, step), added to the loss; 0: off (no extra forward pass)"""
    model: runs.ModelArgs = field(default_factory=runs.ModelArgs)
    """the base model, the reward, the prompts, LoRA and precision"""
    optim: runs.OptimArgs = field(default_factory=lambda: runs.OptimArgs(lr=3e-4))
    """the optimizer (AdamW over the LoRA weights; paper: lr 3e-4)"""
    diffexp: DiffExpConfig = field(default_factory=DiffExpConfig)
    """DiffExp: exploration while sampling (--w-high by default the paper's 5 for DDPO; 3.5 on FLUX.1)"""
    run: runs.RunArgs = field(default_factory=lambda: runs.RunArgs(output_dir="runs/ddpo"))
    """the run and its files"""


# `--config NAME`: a preset whose values become the defaults, each still overridable by its flag.
PRESETS = {"toy": runs.TOY_WORLD | dict(sample_batch_size=8, train_batch_size=8, output_dir="runs/toy-ddpo")}


def check_args(args: Args, world: int) -> Iterator[tuple[bool, str]]:
    """DDPO's own argument checks, as (ok, error line) pairs, for `world` processes (runs.start makes
    the shared ones and prints the first failing line)."""
    per_process = args.samples_per_epoch // max(world, 1)
    # fmt: off
    yield args.samples_per_epoch >= 1, f"--samples-per-epoch must be >= 1 (trajectories per epoch; paper: 64), got {args.samples_per_epoch}"
    yield args.sample_batch_size >= 1, f"--sample-batch-size must be >= 1 (trajectories sampled at once), got {args.sample_batch_size}"
    yield args.train_batch_size >= 1, f"--train-batch-size must be >= 1 (trajectories per training pass), got {args.train_batch_size}"
    yield args.eta is None or 0 < args.eta <= 1, f"--eta must be in (0, 1] for DDPO (0 gives sigma = 0 and no log-prob; {runs.ETA_RANGE}), got {args.eta}; leave it out for the default"
    yield args.inner_epochs >= 1, f"--inner-epochs must be >= 1 (PPO passes over each epoch's trajectories), got {args.inner_epochs}"
    yield 0 < args.timestep_fraction <= 1, f"--timestep-fraction must be in (0, 1], got {args.timestep_fraction}"
    yield args.clip_range > 0, f"--clip-range must be > 0, got {args.clip_range} (paper: 1e-4)"
    yield args.adv_clip_max > 0, f"--adv-clip-max must be > 0 (advantages are clipped to [-max, max]), got {args.adv_clip_max}"
    yield args.stat_buffer_size >= 1, f"--stat-buffer-size must be >= 1 (rewards kept per prompt), got {args.stat_buffer_size}"
    yield args.stat_min_count >= 1, f"--stat-min-count must be >= 1, got {args.stat_min_count}"
    yield args.group_size == 0 or args.group_size >= 2, f"--group-size must be 0 (off) or >= 2 (samples per prompt; a group of one has no spread to normalise by), got {args.group_size}"
    yield args.group_size < 2 or args.samples_per_epoch % args.group_size == 0, f"--group-size {args.group_size} must divide --samples-per-epoch {args.samples_per_epoch} (an epoch is samples / k prompts, each sampled k times)"
    yield args.group_size == 0 or (args.stat_buffer_size, args.stat_min_count) == (Args.stat_buffer_size, Args.stat_min_count), "--stat-buffer-size / --stat-min-count tune the per-prompt tracker, which --group-size replaces (each group is normalised by its own mean and std): drop them, or drop --group-size"
    yield math.isfinite(args.kl_beta) and args.kl_beta >= 0, f"--kl-beta must be a number >= 0 (0 turns the KL penalty off), got {args.kl_beta}"
    yield not args.per_prompt_stat_tracking or args.stat_min_count <= args.stat_buffer_size, f"--stat-min-count {args.stat_min_count} is more than --stat-buffer-size {args.stat_buffer_size} holds, so per-prompt statistics would never be used: lower --stat-min-count or raise --stat-buffer-size"
    yield args.samples_per_epoch % (args.sample_batch_size * world) == 0, f"--samples-per-epoch {args.samples_per_epoch} must be divisible by --sample-batch-size {args.sample_batch_size} x {world} processes"
    yield per_process % args.train_batch_size == 0, f"--train-batch-size {args.train_batch_size} must divide the {per_process} trajectories per process per epoch"
    yield (per_process // args.train_batch_size) % args.gradient_accumulation_steps == 0, f"--gradient-accumulation-steps {args.gradient_accumulation_steps} must divide the {per_process // args.train_batch_size} training batches per epoch"
    # fmt: on


class PerPromptStatTracker:
    """Advantages (r - mean) / std with statistics per prompt string (DDPO): a prompt's own running
    buffer once it holds `min_count` rewards, the whole batch's statistics before that."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count, self.buffers = buffer_size, min_count, {}

    def __call__(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # unique, in order
            idx = np.array([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            ref = np.array(buf) if len(buf) >= self.min_count else rewards
            advantages[idx] = (rewards[idx] - ref.mean()) / (ref.std() + 1e-6)
        return advantages

    def state_dict(self) -> dict:
        return {p: list(b) for p, b in self.buffers.items()}

    def load_state_dict(self, state: dict):
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


def group_prompts(prompts: list[str], num_samples: int, group_size: int, generator: torch.Generator) -> list[str]:
    """GRPO's prompts for one epoch: num_samples / group_size draws from `prompts`, each repeated group_size
    times in a row (sample i is in group i // group_size). Every process draws this same list and samples
    its own slice of it, so a group may span batches and processes; advantages are computed after the
    rewards are gathered."""
    draws = torch.randint(len(prompts), (num_samples // group_size,), generator=generator).tolist()
    return [prompts[i] for i in draws for _ in range(group_size)]


def group_advantages(rewards: np.ndarray, groups: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """GRPO's advantages: (r - mean of r's group) / (std of r's group + eps), `groups` giving each sample's
    group (std over the group, ddof 0, as the tracker's); eps keeps a group of equal rewards at 0."""
    rewards, groups = np.asarray(rewards, dtype=np.float64), np.asarray(groups)
    advantages = np.empty_like(rewards)
    for group in np.unique(groups):
        idx = groups == group
        advantages[idx] = (rewards[idx] - rewards[idx].mean()) / (rewards[idx].std() + eps)
    return advantages


def equal_variance_kl(mean: torch.Tensor, ref_mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, sigma^2 I) || N(ref_mean, sigma^2 I)) per sample [B], averaged (not summed) over C*H*W as
    the log-probs are: mean_CHW((mean - ref_mean)^2) / (2 sigma^2), in float32. The policy and the
    reference take the same step from the same x_t, so they share sigma and differ only in the mean."""
    se = (mean.float() - ref_mean.float()).pow(2).flatten(1).mean(1)
    return se / (2 * sigma.float().reshape(-1) ** 2)


def main(args: Args):
    run = runs.start(args, "ddpo", check_args)  # all checked, --output-dir held, models loaded, LoRA made, resumed
    if run is None:
        return  # --resume of a finished run
    from accelerate.utils import gather_object

    from diffusion import Conditioning, decode, seeded
    from explore import diffexp_conditioning, is_exploring
    from kernels import cfg_ddim_step, ddpo_clip_loss
    from kernels.cfg_ddim import ddim_mean

    pipe, reward_fn, unet = run.pipe, run.reward_fn, run.unet  # the frozen base model, the reward, the denoiser
    T, device, diffexp = pipe.scheduler.config.num_train_timesteps, run.device, args.diffexp
    params, optimizer = run.params, run.optimizer  # the LoRA weights are all that trains
    tracker = PerPromptStatTracker(args.stat_buffer_size, args.stat_min_count)
    tracker.load_state_dict(run.state.get("stat_tracker", {}))  # run.state: the resumed checkpoint's ({} if new)

    timesteps_host, timesteps, schedule = run.timesteps_host, run.timesteps, run.schedule  # DDIM's or the flow's
    eta = args.eta if args.eta is not None else schedule.stochastic_eta  # DDIM's eta or the flow SDE's noise level
    text = run.text  # prompts -> conditioning; .negative is CFG's, .empty DiffExp's e_empty
    B, samples_per_process = args.sample_batch_size, args.samples_per_epoch // run.world
    sample_batches, train_batches = samples_per_process // B, samples_per_process // args.train_batch_size
    latent_size = run.resolution // pipe.vae_scale_factor
    latent_shape = (B, pipe.vae.config.latent_channels, latent_size, latent_size)  # FLUX packs in denoise
    sample_coeffs = [schedule.coefficients(t.expand(B), eta) for t in timesteps]
    num_train_steps = max(1, int(args.num_steps * args.timestep_fraction))

    model_outputs = run.guided(unet)  # (x, t, cond, w) -> CFG's two halves of one denoiser call

    def score(images, prompts):
        start = time.perf_counter()
        with torch.no_grad(), run.accelerator.autocast():
            scores, components = reward_fn(images, prompts)
        return scores.float(), {k: v.float() for k, v in components.items()}, time.perf_counter() - start

    # A reward computed on the host (JPEG, OCR: rewards.on_host) is scored in a thread while the next batch
    # samples. The thread gets one intra-op thread: a second full OpenMP team on the same cores slows the UNet
    # more than the overlap gains (OCR bounds its own threads). Rewards on the device gain little and run inline.
    host_reward = rewards_lib.on_host(args.model.reward)
    reward_worker = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) if host_reward else None

    for epoch in run.epochs():
        exploring = is_exploring(epoch, args.num_epochs, diffexp.explore_frac)

        # --- sampling: store everything the training pass must reproduce -------------------------------
        trajectories, pending, weights_used = [], [], []
        if args.group_size:  # GRPO: the epoch's prompt groups, the same on every process
            epoch_prompts = group_prompts(
                run.prompts, args.samples_per_epoch, args.group_size, seeded(args.run.seed, epoch, 10**5)
            )
        for batch in range(sample_batches):
            g = seeded(args.run.seed, epoch, run.rank, batch)
            first = run.rank * samples_per_process + batch * B  # the batch's place in the epoch (and its groups)
            prompts = (epoch_prompts[first : first + B] if args.group_size
                       else [run.prompts[i] for i in torch.randint(len(run.prompts), (B,), generator=g).tolist()])  # fmt: skip
            # DiffExp's word and weight come from a stream of their own, so every arm of a seed (DiffExp on
            # or off) samples from the same x_T and step noise: comparisons pair by seed.
            cond, guidance_host, weights = diffexp_conditioning(
                diffexp, exploring, prompts, text.encode(prompts), text, timesteps_host, T,
                seeded(args.run.seed, epoch, run.rank, batch, 1),
            )  # fmt: skip
            guidance = guidance_host.to(device)
            # x_T and every step's noise in one draw from the CPU generator (the same samples on any device), one copy.
            noise = torch.randn((args.num_steps + 1, *latent_shape), generator=g).to(device)
            x, latents, log_probs = noise[0], [noise[0]], []
            with torch.no_grad():
                for i, t in enumerate(timesteps):
                    out_u, out_c = model_outputs(x, t, cond, float(guidance_host[i]))
                    x, log_prob = cfg_ddim_step(out_u, out_c, x, guidance[i].expand(B), sample_coeffs[i], noise=noise[i + 1],
                                                return_log_prob=True, backend=args.model.kernels)  # fmt: skip
                    latents.append(x)
                    log_probs.append(log_prob)
                images = decode(pipe, x.to(run.weight_dtype))
            pending.append(reward_worker.submit(score, images, prompts) if reward_worker else score(images, prompts))
            trajectories.append({
                "latents": torch.stack(latents, 1),  # [B, N+1, C, H, W]: x_T ... x_0
                "log_probs": torch.stack(log_probs, 1),  # [B, N]
                "timesteps": timesteps.expand(B, -1),  # [B, N]
                "guidance": guidance.expand(B, -1),  # [B, N]: the scale each step used
                "guidance_host": guidance_host.expand(B, -1),  # the same, on the host
                "cond": cond,  # the (weighted) conditioning, as used (SDXL: with pooled embedding and time ids)
                "prompts": prompts,
            })  # fmt: skip
            weights_used += [w.record() for w in weights]
            run.keep_for_grid(images, prompts, sample_batches)
        waited = time.perf_counter()
        results = [f.result() if reward_worker else f for f in pending]
        waited = time.perf_counter() - waited  # what scoring in the worker did not hide behind sampling
        local_rewards = torch.cat([r[0] for r in results])
        components = {k: run.accelerator.gather(torch.cat([r[1][k] for r in results])) for k in results[0][1]}
        traj = {k: Conditioning.cat([b[k] for b in trajectories]) if k == "cond" else torch.cat([b[k] for b in trajectories])
                for k in trajectories[0] if k != "prompts"}  # fmt: skip

        # --- advantages, from every process's rewards -------------------------------------------------
        rewards = run.accelerator.gather(local_rewards)
        local_prompts = [p for b in trajectories for p in b["prompts"]]
        all_prompts = gather_object(local_prompts) if run.world > 1 else local_prompts
        r = rewards.cpu().numpy()
        if args.group_size:  # GRPO: each sample against its group, from every process's samples (gathered in order)
            local_ids = list(range(run.rank * samples_per_process, (run.rank + 1) * samples_per_process))
            groups = np.array(gather_object(local_ids) if run.world > 1 else local_ids) // args.group_size
            advantages = group_advantages(r, groups)
        else:
            advantages = tracker(all_prompts, r) if args.per_prompt_stat_tracking else (r - r.mean()) / (r.std() + 1e-6)
        advantages = torch.as_tensor(advantages, dtype=torch.float32).clamp(-args.adv_clip_max, args.adv_clip_max)
        traj["advantages"] = advantages.reshape(run.world, -1)[run.rank].to(device)  # this process's samples

        # --- PPO passes: each selected step's log-prob recomputed under its sampling conditions ----------
        keys = ("loss", "approx_kl", "clipfrac", "ratio_min", "ratio_max", "ratio_mean", "grad_norm")
        stats = {k: [] for k in keys + (("kl",) if args.kl_beta > 0 else ())}
        for inner in range(args.inner_epochs):
            g = seeded(args.run.seed, epoch, run.rank, 10**4 + inner)
            perm = torch.randperm(samples_per_process, generator=g)  # on the host: each row's guidance is read there
            step_perm = torch.stack([torch.randperm(args.num_steps, generator=g) for _ in perm])[:, :num_train_steps]
            perm_dev, step_perm_dev = perm.to(device), step_perm.to(device)  # copied once per pass, not per step
            for tb in range(train_batches):
                rows_host = perm[tb * args.train_batch_size : (tb + 1) * args.train_batch_size]
                rows = perm_dev[tb * args.train_batch_size : (tb + 1) * args.train_batch_size]
                b = {k: v[rows_host if k == "guidance_host" else rows] for k, v in traj.items()}
                n = torch.arange(len(rows), device=device)
                for j in range(num_train_steps):
                    s, s_host = step_perm_dev[rows, j], step_perm[rows_host, j]  # one step per trajectory, shuffled
                    x_t, x_prev, t = b["latents"][n, s], b["latents"][n, s + 1], b["timesteps"][n, s]
                    w, w_host = b["guidance"][n, s], b["guidance_host"][torch.arange(len(rows)), s_host]  # its scales
                    coeffs = schedule.coefficients(t, eta)
                    if args.kl_beta > 0:  # the reference policy's step mean: the same call with the LoRA adapters off
                        unet.disable_adapters()
                        with torch.no_grad():
                            ref_mean = ddim_mean(*model_outputs(x_t, t, b["cond"], w_host), x_t, w, coeffs)
                        unet.enable_adapters()
                    out_u, out_c = model_outputs(x_t, t, b["cond"], w_host)
                    loss, st = ddpo_clip_loss(out_u, out_c, x_t, x_prev, w, coeffs, b["log_probs"][n, s], b["advantages"],
                                              args.clip_range, backend=args.model.kernels)  # fmt: skip
                    if args.kl_beta > 0:  # + beta * KL(policy || reference) of this step, per sample
                        kl = equal_variance_kl(ddim_mean(out_u, out_c, x_t, w, coeffs), ref_mean, coeffs.sigma)
                        loss = loss + args.kl_beta * kl.mean()
                        stats["kl"].append(kl.detach().mean())
                    run.accelerator.backward(loss / (num_train_steps * args.gradient_accumulation_steps))
                    for k, v in [("loss", loss.detach()), ("approx_kl", st["approx_kl"]), ("clipfrac", st["clipfrac"]),
                                 ("ratio_min", st["ratio"].min()), ("ratio_max", st["ratio"].max()), ("ratio_mean", st["ratio"].mean())]:  # fmt: skip
                        stats[k].append(v)
                if (tb + 1) % args.gradient_accumulation_steps == 0:
                    stats["grad_norm"].append(run.reduce_and_clip(params))  # averaged across processes, clipped
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    run.update_ema()  # --ema-decay

        # --- log, evaluate, checkpoint ---------------------------------------------------------------
        st = {k: torch.stack([v.float() for v in vals]) for k, vals in stats.items()}
        record = {
            **{k: v.mean().item() for k, v in st.items() if k not in ("ratio_min", "ratio_max")},  # loss ... (kl)
            "ratio_min": st["ratio_min"].min().item(),
            "ratio_max": st["ratio_max"].max().item(),
            "advantage_std": advantages.std().item() if len(advantages) > 1 else 0.0,
            "advantage_min": advantages.min().item(),
            "advantage_max": advantages.max().item(),
            "advantages": advantages.tolist(),  # per sample, in the order of prompt_weights (every process's)
        }
        if host_reward:  # the reward's own time per sample (in the worker), and the wait it added to the epoch
            record |= {
                "reward_sec_per_sample": sum(r[2] for r in results) / len(local_rewards),
                "reward_wait_sec": waited,
            }
        run.end_epoch(epoch, rewards, record, show=("approx_kl", "clipfrac", "ratio_min", "ratio_max", "kl", "reward_sec_per_sample",
                      "reward_wait_sec"), components=components, prompt_weights=weights_used, state={"stat_tracker": tracker.state_dict()})  # fmt: skip
    if reward_worker is not None:
        reward_worker.shutdown()


cli = functools.partial(runs.cli, Args, PRESETS, trainer="ddpo")  # cli() reads sys.argv, cli(argv) a list


if __name__ == "__main__":
    main(cli())  # Ctrl-C: one line saying where it stopped and how to resume (runs.Run.interrupted_line)
