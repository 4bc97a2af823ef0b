"""Rerunnable speed and memory check of one DPOK iteration, phase by phase: ratios and peaks
measured in one run, never timed tests.

    python benchmark.py --out tiny.json                       # the shapes world, CPU
    python benchmark.py --sd15 --device cuda --out gpu.json   # SD v1.5's architecture, 512 px
    python benchmark.py --sd15 --latent-size 8 --out t.json   # the same table on CPU, tiny latents
    python benchmark.py --sd2 --device cuda --out gpu2.json   # SD 2.1's (v prediction), 768 px
    python benchmark.py --sdxl --device cuda --out xl.json    # SDXL base's, full size, 1024 px

`--sd15` saves architectures.sd15_pipeline (SD v1.5's exact architecture, random weights: speed and
memory do not depend on their values; `--sd2`, `--sdxl`: SD 2.1's and SDXL's, the latter full
size) and loads it through dpok's own `--model PATH` path, with
the official single-prompt settings: 10 images x 50 steps, guidance 7.5, value function on,
beta 0.01, 5 policy updates of 12 micro-batches x 4 transitions (on the CPU, a smoke test of
2 images x 5 steps and one policy update per iteration unless --images/--steps say otherwise).
Rewards are image-reward's ImageReward and aesthetic predictor with their real architectures
and random weights (architectures.imagereward_model, architectures.aesthetic_model).

One table per configuration, dtype x micro-batching (4 x 12, then 48 x 1: the same gradient),
biggest last, so that running out of memory ends only the last ones. Per phase: seconds (best of
--repeats after one warm-up) and peak GPU memory (torch.cuda.max_memory_allocated, reset per
phase). The rewards do not depend on the UNet's dtype: they are measured once, first.
Per configuration also the ratio's two scales (README Deviations 6): the rounding gap between the
rollout and the update's micro-batch shape, and how far one update at --lr moves the ratio.
"""

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time

import diffusers
import torch

import dpok
import architectures
import rewards


def measure(fn, repeats, cuda, warm_up=True):
    """(best seconds of `repeats` calls after a warm-up, peak GPU memory in GiB or None)."""
    if warm_up:
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return dict(seconds=min(times), peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def reward_phases(options, folder, images, prompts):
    """The reward and fidelity scorers of the real run, batched and (ImageReward) per image."""
    from torchvision.transforms.functional import to_pil_image

    cuda, rows = options.device.startswith("cuda"), {}
    compressibility = rewards.compressibility_reward
    rows["reward: compressibility"] = measure(lambda: compressibility(images, prompts), options.repeats, cuda)
    if options.no_imagereward:
        return rows, None, {}
    model = architectures.imagereward_model(os.path.join(folder, "imagereward"), device=options.device)
    imagereward = rewards.imagereward_reward(options.device, model)
    aesthetic = rewards.aesthetic_score(options.device, architectures.aesthetic_model(
        os.path.join(folder, "aesthetic"), device=options.device))
    with torch.no_grad():
        rows["reward: ImageReward, batched"] = measure(
            lambda: imagereward(images, prompts), options.repeats, cuda)
        rows["reward: ImageReward, its per-image score"] = measure(
            lambda: [model.score(p, to_pil_image(x.float().cpu())) for p, x in zip(prompts, images)],
            options.repeats, cuda)
        rows["fidelity: aesthetic score, batched"] = measure(
            lambda: aesthetic(images, prompts), options.repeats, cuda)
    return rows, imagereward, aesthetic


@torch.no_grad()
def rescore(run, args, transitions, batch_size):
    """The transitions' log-probs under the current weights, in micro-batches of batch_size."""
    log_probs = []
    for start in range(0, len(transitions["log_prob"]), batch_size):
        micro = {k: v[start:start + batch_size] for k, v in transitions.items()}
        eps = dpok.guided_eps(run.pipe.unet, run.pipe.scheduler, micro["latents"], micro["timesteps"],
                              run.text, micro["prompt_index"], args.guidance)
        log_probs.append(dpok.ddim_step_logprob(run.pipe.scheduler, eps, micro["timesteps"],
                                                micro["latents"], args.eta, micro["next_latents"])[1])
    return torch.cat(log_probs)


def rounding_and_update(run, args, batch_size, grad_accum):
    """README Deviations 6, per configuration. The rounding gap: the rollout's own transitions
    re-scored at the update's micro-batch shape by the weights that sampled them (the first
    update takes them as exactly on-policy; later updates and the buffer see this gap). Then the
    update's effect: one policy update at --lr, and the same transitions re-scored at the same
    shape: how far a real step moves the ratio, against the gap and the clip."""
    index = torch.zeros(args.samples_per_iter, dtype=torch.long, device=args.device)
    transitions, images = dpok.rollout(run.pipe, run.text, index, args,
                                       torch.Generator().manual_seed(1))
    before = rescore(run, args, transitions, batch_size)
    scores = dpok.score(run, images, index, measured=False)[0]
    n = len(transitions["log_prob"])
    batch = dict(transitions, reward=scores.repeat_interleave(n // len(scores)))
    batch["advantage"] = batch["reward"] - batch["reward"].mean()
    batch = {k: v[torch.randperm(n, generator=torch.Generator().manual_seed(2))[:batch_size * grad_accum]]
             for k, v in batch.items()}
    dpok.update(run, batch, lambda micro: dpok.policy_loss(run.pipe.unet, run.pipe.scheduler, micro,
                                                           run.text, args), args)
    effect = (rescore(run, args, transitions, batch_size) - before).exp().sub(1).abs()
    gap = (before - transitions["log_prob"]).exp().sub(1).abs()
    return dict(transitions=n, max_rescore_gap=gap.max().item(),
                rescore_beyond_clip=(gap > args.ratio_clip).float().mean().item(),
                update_effect_median=effect.median().item(), update_effect_max=effect.max().item(),
                update_beyond_clip=(effect > args.ratio_clip).float().mean().item(), lr=args.lr,
                ratio_clip=args.ratio_clip)


def configuration(options, model_args, dtype, batch_size, grad_accum, scorers):
    """Every phase of one DPOK iteration in one dtype and micro-batching."""
    args = dpok.parse_args([*model_args, "--dtype", dtype, "--batch-size", str(batch_size),
                            "--grad-accum", str(grad_accum)])
    cuda, repeats = options.device.startswith("cuda"), options.repeats
    run = dpok.setup(args, [args.prompt])
    run.pipe.set_progress_bar_config(disable=True)  # its own call, measured below
    if scorers[0] is not None:  # ImageReward and the aesthetic score, as the real run has them
        run.reward_fn, run.measures = scorers
    n, rows = args.samples_per_iter, {}
    index = torch.zeros(n, dtype=torch.long, device=args.device)
    sample = lambda: dpok.rollout(run.pipe, run.text, index, args,
                                  torch.Generator().manual_seed(0))
    pipeline_call = lambda: run.pipe(args.prompt, num_images_per_prompt=n,
                                     num_inference_steps=args.steps, guidance_scale=args.guidance,
                                     eta=args.eta, output_type="pt",
                                     generator=torch.Generator().manual_seed(0))
    rows[f"diffusers pipeline call, {n} images x {args.steps} steps"] = measure(pipeline_call, repeats, cuda)
    rows["rollout (same images + transitions + log-probs)"] = measure(sample, repeats, cuda)
    ratio = rounding_and_update(run, args, batch_size, grad_accum)
    dpok.dpok_iteration(run, args)  # fills the buffer
    if run.value_fn is not None:
        rows["value update"] = measure(lambda: dpok.update_value_function(run, args), repeats, cuda)
    batch = dpok.sample_batch(run.buffer, grad_accum * batch_size, run.generator)
    batch["advantage"] = batch["reward"]
    for beta, name in ((0.0, "policy update, no KL term"), (args.kl_beta, "policy update, with KL term")):
        beta_args = dataclasses.replace(args, kl_beta=beta)
        loss_fn = lambda micro: dpok.policy_loss(run.pipe.unet, run.pipe.scheduler, micro, run.text,
                                                 beta_args)
        rows[name] = measure(lambda: dpok.update(run, batch, loss_fn, beta_args), repeats, cuda)
    # warmed up by the iteration that filled the buffer
    rows["whole iteration"] = measure(lambda: dpok.dpok_iteration(run, args), repeats, cuda, False)
    # What the official code's second, frozen UNet would add (ours: adapters off, nothing).
    frozen = [p for name, p in run.pipe.unet.named_parameters() if "lora" not in name]
    second = dict(computed_gib=sum(p.numel() * p.element_size() for p in frozen) / 2**30)
    if cuda:
        before = torch.cuda.memory_allocated()
        unet_copy = copy.deepcopy(run.pipe.unet)
        second["measured_gib"] = (torch.cuda.memory_allocated() - before) / 2**30
        del unet_copy
    return dict(dtype=dtype, micro_batch=batch_size, grad_accum=grad_accum, phases=rows,
                ratio=ratio, second_unet=second, adapters_off_reference_gib=0.0,
                hours_for_2000_iterations=rows["whole iteration"]["seconds"] * 2000 / 3600)


def show(result):
    print(f"\n{result['dtype']}, micro-batches of {result['micro_batch']} x {result['grad_accum']}")
    if "error" in result:
        return print(f"  {result['error']}")
    print(f"  {'phase':<56} {'seconds':>9} {'peak GiB':>9}")
    for name, row in result["phases"].items():
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        print(f"  {name:<56} {row['seconds']:9.3f} {peak:>9}")
    phases = result["phases"]
    call = next(v for k, v in phases.items() if k.startswith("diffusers"))
    ratio = phases["rollout (same images + transitions + log-probs)"]["seconds"] / call["seconds"]
    kl = phases["policy update, with KL term"]["seconds"] / phases["policy update, no KL term"]["seconds"]
    print(f"  rollout / pipeline call {ratio:.2f}; KL term x{kl:.2f} per update; a second UNet "
          f"would add {result['second_unet']['computed_gib']:.3f} GiB (adapters off: 0); "
          f"2000 iterations: {result['hours_for_2000_iterations']:.1f} h")
    r = result["ratio"]
    print(f"  the rollout's {r['transitions']} transitions re-scored at the update's shape: max |ratio - 1| "
          f"{r['max_rescore_gap']:.1e} ({r['rescore_beyond_clip']:.0%} beyond the clip {r['ratio_clip']:g}); "
          f"one update at lr {r['lr']:g} moves it by {r['update_effect_median']:.1e} (median), "
          f"{r['update_effect_max']:.1e} (max), {r['update_beyond_clip']:.0%} beyond the clip")


# The Stable Diffusion architectures, by flag: (builder, default latent size, name)
FAMILIES = {"sd15": (architectures.sd15_pipeline, 64, "SD v1.5"),
            "sd2": (architectures.sd2_pipeline, 96, "SD 2.1"),
            "sdxl": (lambda size: architectures.sdxl_pipeline(size, full=True), 128, "SDXL base")}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like dpok.py's bad input
        sys.exit(print(f"benchmark.py: error: {message}", file=sys.stderr) or 2)


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    for flag, (_, size, name) in FAMILIES.items():
        parser.add_argument(f"--{flag}", action="store_true",
                            help=f"{name}'s architecture, random weights ({size * 8} px)")
    parser.add_argument("--latent-size", type=int, help="with an architecture (default: its own, "
                        "64 for SD v1.5's 512 px)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 float16 on a GPU, float32 bfloat16 on the CPU")
    parser.add_argument("--images", type=int, help="images per iteration (default: the world's; "
                        "an architecture on the CPU: 2)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the world's; an architecture on the "
                        "CPU: 5)")
    parser.add_argument("--lr", type=float, help="learning rate of the update whose effect on the ratio is "
                        "measured (default: the world's; 1e-5 with an architecture, the official)")
    parser.add_argument("--ratio-clip", type=float,
                        help="(default: the world's; 1e-4 with an architecture, the official)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per phase after a warm-up")
    parser.add_argument("--no-imagereward", action="store_true",
                        help="skip ImageReward and the aesthetic score (rewards: compressibility)")
    parser.add_argument("--out", help="write the tables as JSON to this file")
    options = parser.parse_args(argv)
    chosen = [flag for flag in FAMILIES if getattr(options, flag)]
    if len(chosen) > 1:
        parser.error("give one of --sd15, --sd2 and --sdxl")
    real = chosen[0] if chosen else None  # a Stable Diffusion architecture, not the shapes world
    if options.latent_size is None:
        options.latent_size = FAMILIES[real][1] if real else 64
    for name in ("images", "steps", "repeats", "latent_size"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive whole number")
    if options.latent_size % 8:  # the UNet halves it three times
        parser.error(f"--latent-size must be a multiple of 8, got {options.latent_size}")
    if options.out and (os.path.isdir(options.out) or not os.access(os.path.dirname(os.path.abspath(
            options.out)), os.W_OK)):
        parser.error(f"--out {options.out}: not a file that can be written")
    diffusers.utils.logging.disable_progress_bar()
    cuda = options.device.startswith("cuda")
    options.dtypes = options.dtypes or (["bfloat16", "float16"] if cuda else ["float32", "bfloat16"])
    if real and not cuda:  # a smoke test: SD's UNet takes seconds per sample on 2 CPU cores
        options.images, options.steps = options.images or 2, options.steps or 5
    with tempfile.TemporaryDirectory() as folder:
        model = os.path.join(folder, "model")
        if real:
            model_args = ["--model", model, "--reward", "compressibility",
                          "--prompt", "A green colored rabbit"]
        else:
            model_args = ["--tiny", "--prompt", "three green squares"]
        model_args += ["--device", options.device, "--out", os.path.join(folder, "unused")]
        model_args += ["--samples-per-iter", str(options.images)] * bool(options.images)
        model_args += ["--steps", str(options.steps)] * bool(options.steps)
        model_args += ["--lr", str(options.lr)] * (options.lr is not None)
        model_args += ["--ratio-clip", str(options.ratio_clip)] * (options.ratio_clip is not None)
        model_args += ["--policy-steps", "1"] * bool(real and not cuda)  # CPU smoke test
        try:  # dpok.py's own checks (rates, device), before any work
            args = dpok.parse_args(model_args)
        except dpok.UsageError as e:
            parser.error(str(e))
        if real:
            FAMILIES[real][0](options.latent_size).to(dtype=torch.float16).save_pretrained(model)
        pixels = FAMILIES[real][1] * 8 if real else 32
        images = torch.rand(args.samples_per_iter, 3, pixels, pixels,
                            generator=torch.Generator().manual_seed(0))
        prompts = [args.prompt] * len(images)
        reward_rows, imagereward, aesthetic = reward_phases(options, folder, images.to(args.device), prompts)
        scorers = (imagereward, dict(fidelity=aesthetic)) if real else (None, None)
        print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}, "
              f"{FAMILIES[real][2] + ' architecture' if real else 'shapes world'}, "
              f"{args.samples_per_iter} "
              f"images x {args.steps} steps; rewards on {len(images)} images:")
        for name, row in reward_rows.items():
            print(f"  {name:<56} {row['seconds']:9.3f}")
        results = []
        for batch_size, grad_accum in ((4, 12), (48, 1)):  # the same 48 transitions, biggest last
            for dtype in options.dtypes:
                try:
                    results.append(configuration(options, model_args, dtype, batch_size,
                                                 grad_accum, scorers))
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    results.append(dict(dtype=dtype, micro_batch=batch_size,
                                        grad_accum=grad_accum, error="out of memory"))
                show(results[-1])
    report = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                  world=real or "shapes",
                  latent_size=options.latent_size,
                  images=args.samples_per_iter, steps=args.steps, repeats=options.repeats,
                  rewards=reward_rows, configurations=results)
    if options.out:
        with open(options.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
