"""Rerunnable speed check on the tiny world (CPU): ratios measured in one run, never timed tests.

    python benchmark.py            # prints the table the README quotes

1. Sampling: dpok.rollout (which also keeps every transition and its log-prob) against
   diffusers' own StableDiffusionPipeline call for the same images, steps, guidance and eta.
2. One policy update (grad_accum x batch_size transitions) with and without the KL term, which
   costs one extra no-grad UNet pass per micro-batch.
"""

import time

import torch

import dpok


def best_of(fn, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    args = dpok.parse_args(["--tiny", "--prompt", "a green colored rabbit", "--out", "unused"])
    pipe = dpok.load_pipeline(args)
    params = dpok.add_lora(pipe.unet, args.lora_rank)
    cond, uncond = dpok.encode_prompts(pipe, [args.prompt])
    n = args.samples_per_iter
    index = torch.zeros(n, dtype=torch.long)

    def ours():
        dpok.rollout(pipe, cond, uncond, index, args, torch.Generator().manual_seed(0))

    def diffusers_call():
        pipe(args.prompt, num_images_per_prompt=n, num_inference_steps=args.steps,
             guidance_scale=args.guidance, eta=args.eta, output_type="pt",
             generator=torch.Generator().manual_seed(0))

    ours(), diffusers_call()  # warm-up
    t_ours, t_ref = best_of(ours), best_of(diffusers_call)
    transitions, _ = dpok.rollout(pipe, cond, uncond, index, args, torch.Generator().manual_seed(0))
    transitions["reward"] = torch.randn(len(transitions["log_prob"]))
    batch = {k: v[: args.batch_size * args.grad_accum] for k, v in transitions.items()}

    def update(kl_beta):
        run = dpok.parse_args(["--tiny", "--prompt", args.prompt, "--out", "unused",
                               "--kl-beta", str(kl_beta)])
        loss_fn = lambda m: dpok.policy_loss(pipe.unet, pipe.scheduler, m, cond, uncond, None, run)
        return lambda: dpok.accumulate_gradient(loss_fn, batch, run.batch_size)

    t_kl, t_no_kl = best_of(update(0.01)), best_of(update(0.0))
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
