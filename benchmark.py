"""Rerunnable speed check: ratios measured in one run, never timed tests.

    python benchmark.py                         # tiny world on the CPU: the table the README quotes
    python benchmark.py --sd15 --device cuda    # SD v1.5's architecture (random weights), 512 px

1. Sampling: dpok.rollout (which also keeps every transition and its log-prob) against
   diffusers' own StableDiffusionPipeline call for the same images, steps, guidance and eta.
2. One policy update (grad_accum x batch_size transitions) with and without the KL term, which
   costs one extra no-grad UNet pass per micro-batch.

`--sd15` builds offline.sd15_pipeline at 64x64 latents (SD's 512 px) with the official settings
(10 images x 50 steps, 12 x 4 transitions per update): speed and memory do not depend on the
weights' values. It is meant for a GPU; on 2 CPU cores one guided step takes seconds.
"""

import argparse
import dataclasses
import time

import torch

import dpok
import offline


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15", action="store_true", help="SD v1.5's architecture at 512 px")
    parser.add_argument("--latent-size", type=int, default=64, help="with --sd15 (64: 512 px)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    prompt = "A green colored rabbit" if options.sd15 else "three green squares"
    world = ["--reward", "compressibility"] if options.sd15 else ["--tiny"]
    args = dpok.parse_args([*world, "--prompt", prompt, "--device", options.device])
    if options.sd15:
        pipe = offline.sd15_pipeline(options.latent_size).to(args.device, getattr(torch, args.dtype))
        pipe.scheduler = dpok.ddim_scheduler(pipe.scheduler.config, args.steps)
        pipe.set_progress_bar_config(disable=True)
        pipe.unet.requires_grad_(False)
    else:
        pipe = dpok.load_pipeline(args)
    params = dpok.add_lora(pipe.unet, args.lora_rank)
    cond, uncond, _ = dpok.encode_prompts(pipe, [prompt])
    n = args.samples_per_iter
    index = torch.zeros(n, dtype=torch.long, device=args.device)

    def ours():
        dpok.rollout(pipe, cond, uncond, index, args, torch.Generator().manual_seed(0))

    def diffusers_call():
        pipe(prompt, num_images_per_prompt=n, num_inference_steps=args.steps,
             guidance_scale=args.guidance, eta=args.eta, output_type="pt",
             generator=torch.Generator().manual_seed(0))

    ours(), diffusers_call()  # warm-up
    t_ours, t_ref = best_of(ours, options.repeats), best_of(diffusers_call, options.repeats)
    transitions, _ = dpok.rollout(pipe, cond, uncond, index, args, torch.Generator().manual_seed(0))
    transitions["reward"] = transitions["advantage"] = torch.randn(len(transitions["log_prob"]))
    batch = {k: v[: args.batch_size * args.grad_accum].to(args.device) for k, v in transitions.items()}

    def update(kl_beta):
        run = dataclasses.replace(args, kl_beta=kl_beta)
        loss_fn = lambda m: dpok.policy_loss(pipe.unet, pipe.scheduler, m, cond, uncond, run)
        return lambda: dpok.accumulate_gradient(loss_fn, batch, run.batch_size)

    t_kl, t_no_kl = best_of(update(0.01), options.repeats), best_of(update(0.0), options.repeats)
    for p in params:
        p.grad = None
    print(f"{'what':<52} {'seconds':>8} {'ratio':>6}")
    print(f"{f'diffusers pipeline, {n} images x {args.steps} steps':<52} {t_ref:8.3f} {1:6.2f}")
    print(f"{'dpok.rollout, same images + log-probs':<52} {t_ours:8.3f} {t_ours / t_ref:6.2f}")
    size = len(batch["reward"])
    print(f"{f'policy update, {size} transitions, no KL term':<52} {t_no_kl:8.3f} {1:6.2f}")
    print(f"{'policy update, same, with KL term (+1 no-grad pass)':<52} {t_kl:8.3f} "
          f"{t_kl / t_no_kl:6.2f}")


if __name__ == "__main__":
    main()
