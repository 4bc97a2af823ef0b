"""DPOK: online RL fine-tuning of a text-to-image diffusion model with a KL penalty.

Fan et al., "DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion Models",
NeurIPS 2023, https://arxiv.org/abs/2305.16381; read it beside the paper, top to bottom. Every
departure from the paper and the official code is numbered in the README's "Deviations" and
cited where it happens as (deviation N).

    python dpok.py --prompt "A green colored rabbit" --kl-beta 0.01     # SD v1.5 + ImageReward, GPU
    python dpok.py --tiny --prompt "two yellow squares"                 # offline, CPU, minutes
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from types import SimpleNamespace

import diffusers
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import transformers
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torchvision.utils import save_image
from tqdm import tqdm


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def beside(module):
    """A module of this repository beside dpok.py, imported only by the runs that use it:
    rewards.py (every --reward), shapes.py and its architectures.py (the offline world, --tiny)."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"this run needs {module}.py beside dpok.py, as in the dpok repository")
    return importlib.import_module(module)


# ---- Hyperparameters: the official code's defaults (README "The official code") unless marked otherwise
def opt(default, help, choices=None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Args:
    prompt: str = opt(None, "the single prompt to fine-tune on")
    prompts: str = opt(None, "file with one prompt per line (multi-prompt training)")
    model: str = opt("stable-diffusion-v1-5/stable-diffusion-v1-5", "diffusers model id or path")
    tiny: bool = opt(False, "the shapes world (shapes.py): its shipped tiny model, offline, CPU")
    reward: str = opt("imagereward", "a reward of rewards.py or shapes.py (README), or FILE.py:FUNCTION")
    lora_rank: int = opt(4, "LoRA rank on the UNet attention projections")
    steps: int = opt(50, "DDIM steps T per image (paper Sec. 5)")
    guidance: float = opt(7.5, "classifier-free guidance scale w")
    eta: float = opt(1.0, "DDIM eta in (0, 1]; > 0 so that every step is a Gaussian policy")
    samples_per_iter: int = opt(10, "images sampled per iteration (g_batch_size)")
    buffer_size: int = opt(1000, "FIFO buffer of the last N transitions")
    policy_steps: int = opt(5, "optimizer steps per iteration (p_step)")
    grad_accum: int = opt(12, "micro-batches accumulated per optimizer step")
    batch_size: int = opt(4, "transitions per micro-batch (p_batch_size)")
    lr: float = opt(1e-5, "AdamW learning rate of the LoRA weights (weight decay 0, official)")
    clip_norm: float = opt(0.1, "gradient-norm clip")
    reward_alpha: float = opt(10.0, "alpha: weight of the reward term (reward_weight)")
    kl_beta: float = opt(0.01, "beta: weight of the KL regulariser (kl_weight)")
    ratio_clip: float = opt(1e-4, "importance ratio clamped to [1 - c, 1 + c]")
    no_value: bool = opt(False, "no value function: advantage = reward")
    official_advantage: bool = opt(False, "advantage r - V as the official code, not centred (dev. 10)")
    value_steps: int = opt(5, "value batches accumulated into its one step per iteration (v_step)")
    value_batch_size: int = opt(256, "transitions per value-function batch (v_batch_size)")
    value_lr: float = opt(1e-4, "value-function learning rate")
    iterations: int = opt(2000, "outer iterations (official: 10000 policy steps / 5)")
    seed: int = opt(0, "seed of everything")
    out: str = opt("dpok-out", "output folder")
    grid_every: int = opt(10, "save a PNG grid of the rollout every N iterations")
    save_every: int = opt(50, "checkpoint (LoRA, optimizers, buffer, RNG) every N iterations")
    resume: bool = opt(False, "continue from the checkpoint in --out")
    overwrite: bool = opt(False, "replace a previous run in --out")
    supervised: bool = opt(False, "train the supervised baseline (paper Sec. 4.2) instead of RL")
    supervised_samples: int = opt(1000, "images per prompt sampled once (paper: 20K in all)")
    eval: str = opt(None, "no training: compare the LoRA in this folder with the pretrained model")
    eval_samples: int = opt(50, "images per prompt for --eval (paper: 50 single, 30 multi-prompt)")
    device: str = opt(None, "cpu | cuda | cuda:N; default cuda if available")
    dtype: str = opt(None, "default float16 on GPU, float32 on CPU", ["float32", "bfloat16", "float16"])


# ---- Models: Stable Diffusion (or the shapes world's tiny model) via diffusers, LoRA on the UNet
def ddim_scheduler(config, steps):
    """The paper's sampler, DDIM, from a model's scheduler config (SD v1.5 ships PNDM's).
    `ddim_step_logprob` is `DDIMScheduler.step` for epsilon or v prediction without clipping or
    thresholding; anything else would make every log-prob wrong: refused, or switched off."""
    scheduler = DDIMScheduler.from_config(config)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise UsageError(f"the model predicts {scheduler.config.prediction_type!r}; the DPOK "
                         "sampler implements epsilon and v prediction only")
    if steps > scheduler.config.num_train_timesteps:
        raise UsageError(f"--steps {steps} exceeds the model's "
                         f"{scheduler.config.num_train_timesteps} training timesteps")
    if scheduler.config.clip_sample or scheduler.config.thresholding:
        say("note: the DPOK sampler samples without the model scheduler's clip_sample and thresholding")
    return DDIMScheduler.from_config(scheduler.config, clip_sample=False, thresholding=False)


def load_pipeline(args):
    try:  # the scheduler first: an unsupported one is refused before the weights load
        config = DDIMScheduler.load_config(args.model, subfolder="scheduler")
        pipe = DiffusionPipeline.from_pretrained(  # SD 1, 2 or XL, as model_index.json names it
            args.model, scheduler=ddim_scheduler(config, args.steps), safety_checker=None,
            torch_dtype=getattr(torch, args.dtype), requires_safety_checker=False)
    except UsageError:
        raise
    except Exception as e:  # offline, unknown id, incomplete folder: all end the same way
        raise UsageError(
            f"cannot load model {args.model!r} ({type(e).__name__}); download it once with "
            f"`huggingface-cli download {args.model}` while online, or run offline with --tiny")
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise UsageError(f"{args.model} holds a {type(pipe).__name__}, not Stable Diffusion 1, 2 or XL")
    if args.dtype == "float16" and pipe.vae.config.force_upcast and hasattr(pipe, "text_encoder_2"):
        pipe.vae.to(torch.float32)  # as SDXL's pipeline does (its VAE overflows); SD 1/2's stays
    return pipe.to(args.device)  # add_lora freezes the UNet; the rest only ever runs without grad


def add_lora(unet, rank):
    """LoRA (Hu et al. 2021) on the UNet's attention projections; only these train. B starts at
    zero, so training starts at the pretrained model, which disable_adapters() gives back."""
    targets = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection (official)
    width = min(min(m.in_features, m.out_features) for name, m in unet.named_modules()
                if name.endswith(targets))
    if rank > width:
        raise UsageError(f"--lora-rank {rank} exceeds the narrowest attention projection ({width})")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(targets)))
    cast_training_params(unet, torch.float32)  # fp32 master weights under half precision
    return [p for p in unet.parameters() if p.requires_grad]


@torch.no_grad()
def encode_prompts(pipe, prompts):
    """Computed once (LoRA is on the UNet only): the UNet's text inputs, a dict of the prompts' rows
    then the empty prompt's (-1, guidance's), and V's text features (P, D), pooled at the end of
    text (SDXL: its pipeline's encoding, pooled embedding and size ids of the samples drawn here)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        states, empty, pooled, empty_pooled = pipe.encode_prompt(prompts, device=pipe.device)
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        ids = torch.tensor([[side, side, 0, 0, side, side]] * (len(prompts) + 1), device=pipe.device)
        return dict(encoder_hidden_states=torch.cat([states, empty[:1]]), time_ids=ids.to(states.dtype),
                    text_embeds=torch.cat([pooled, empty_pooled[:1]])), pooled
    ids = pipe.tokenizer([*prompts, ""], padding="max_length", truncation=True, return_tensors="pt",
                         max_length=pipe.tokenizer.model_max_length).input_ids
    out = pipe.text_encoder(ids.to(pipe.device))
    return dict(encoder_hidden_states=out.last_hidden_state), out.pooler_output[:-1]


# ---- Sampler: one DDIM step is one Gaussian policy action (paper Sec. 4).
def ddim_coefficients(scheduler, timestep, eta):
    """a_t = alphas_cumprod[t], a_prev at the previous DDIM timestep (the final alpha after the
    last step), sigma_t = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)); one per timestep."""
    t = torch.as_tensor(timestep, device=scheduler.alphas_cumprod.device).long().reshape(-1)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod
    # Test before indexing: clamping prev_t first would never use the final alpha (DDPO's bug).
    a_t, a_prev = alphas[t], torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)],
                                         scheduler.final_alpha_cumprod)
    return a_t, a_prev, eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()


def ddim_step_logprob(scheduler, model_output, timestep, sample, eta, prev_sample=None,
                      generator=None):
    """One DDIM step p(x_{t-1} | x_t) = N(mu, sigma_t^2 I); returns (x_{t-1}, log p(x_{t-1})).
    Samples x_{t-1} when `prev_sample` is None, else scores the given one (re-scoring stored
    transitions under the current policy). `timestep` is an int or one per sample. The
    log-prob is averaged over latent dimensions (deviation 1); where sigma_t = 0 the step is a
    point mass with no density and its log-prob is reported as 0 (deviation 4)."""
    model_output, sample = model_output.float(), sample.float()  # also in half precision (dev. 6)
    a_t, a_prev, sigma = (c.to(sample.device).view(-1, 1, 1, 1)
                          for c in ddim_coefficients(scheduler, timestep, eta))
    x0_hat = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
    mu = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma**2).sqrt() * model_output
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator,
                            device=generator.device if generator else sample.device)
        prev_sample = mu + sigma * noise.to(sample.device)
    prev_sample = prev_sample.float()
    stochastic = sigma > 0
    std = torch.where(stochastic, sigma, torch.ones_like(sigma))
    log_prob = -((prev_sample - mu) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return prev_sample, (log_prob * stochastic).mean(dim=(1, 2, 3))


def unet_eps(unet, scheduler, latents, timesteps, text, prompt_index):
    """eps_theta(x_t, t, z) (z: text's rows prompt_index), the noise the UNet's output implies: the
    output under epsilon prediction; under v prediction (SD 2.x; v = sqrt(a_t) eps - sqrt(1 - a_t)
    x_0) sqrt(a_t) v + sqrt(1 - a_t) x_t as in DDIMScheduler.step, linear in v: guiding v is
    guiding eps. Steps, log-probs, KL: all in eps."""
    rows = {name: value[prompt_index] for name, value in text.items()}
    states = rows.pop("encoder_hidden_states")
    output = unet(latents.to(states.dtype), timesteps, states, added_cond_kwargs=rows).sample.float()
    if scheduler.config.prediction_type == "epsilon":
        return output
    a_t = scheduler.alphas_cumprod.to(output.device)[timesteps].view(-1, 1, 1, 1)
    return a_t.sqrt() * output + (1 - a_t).sqrt() * latents.float()


def guided_eps(unet, scheduler, latents, timesteps, text, prompt_index, guidance):
    """Classifier-free guidance, eps_u + w (eps_c - eps_u), in one UNet call on [empty prompt;
    prompt]. Guidance is part of the policy: the log-prob is that of the guided step."""
    n = latents.shape[0]
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(n)
    both = torch.cat([torch.full_like(prompt_index, -1), prompt_index])  # -1: the empty prompt
    eps_uncond, eps_cond = unet_eps(unet, scheduler, latents.repeat(2, 1, 1, 1), timesteps.repeat(2),
                                    text, both).chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@contextlib.contextmanager
def pretrained_model(unet):
    """The pretrained model p_pre: the same UNet with its LoRA adapters off (deviation 5)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


# ---- Rollout: sample trajectories x_T -> x_0 and store every stochastic transition.
@torch.no_grad()
def rollout(pipe, text, prompt_index, args, generator, kl_bound=False):
    """Sample len(prompt_index) images with the current UNet (LoRA on); returns (transitions,
    images in [0, 1]). `transitions` holds, per (image, step), flattened image-major: latents x_t,
    next_latents x_{t-1}, timesteps t, step (0..T-1), prompt_index, log_prob (the old log-prob,
    float32, of exactly the stored x_{t-1}), on_policy (True: sampled by the UNet's weights as they
    are now), and with kl_bound (eval) kl, the step's exact KL to the pretrained model."""
    scheduler, unet = pipe.scheduler, pipe.unet
    scheduler.set_timesteps(args.steps, device=pipe.device)
    n, size = len(prompt_index), unet.config.sample_size
    x = torch.randn((n, unet.config.in_channels, size, size), generator=generator,
                    device=generator.device).to(pipe.device) * scheduler.init_noise_sigma
    latents, log_probs, kl = [x], [], []
    for t in scheduler.timesteps:
        eps = guided_eps(unet, scheduler, x, t, text, prompt_index, args.guidance)
        if kl_bound:  # KL_t of two Gaussians with one sigma_t, summed over latent dims
            with pretrained_model(unet):
                eps_pre = guided_eps(unet, scheduler, x, t, text, prompt_index, args.guidance)
            weight = kl_step_weight(scheduler, t, args.eta).to(x.device)  # sigma_t = 0: not kept
            kl.append(weight * ((eps - eps_pre) ** 2).sum(dim=(1, 2, 3)))
        x, log_prob = ddim_step_logprob(scheduler, eps, t, x, args.eta, generator=generator)
        latents.append(x)
        log_probs.append(log_prob)
    latents = torch.stack(latents, dim=1)  # (B, T + 1, 4, h, w)
    keep = ddim_coefficients(scheduler, scheduler.timesteps, args.eta)[2].to(pipe.device) > 0  # (T,)
    transitions = dict(
        latents=latents[:, :-1][:, keep].flatten(0, 1),  # (B * T', 4, h, w)
        next_latents=latents[:, 1:][:, keep].flatten(0, 1),
        log_prob=torch.stack(log_probs, dim=1)[:, keep].flatten(),  # (B * T',)
        timesteps=scheduler.timesteps[keep].repeat(n),
        step=torch.arange(len(scheduler.timesteps), device=pipe.device)[keep].repeat(n),
        prompt_index=prompt_index.repeat_interleave(int(keep.sum())),
        on_policy=torch.ones(n * int(keep.sum()), dtype=torch.bool, device=pipe.device),
        **({"kl": torch.stack(kl, dim=1)[:, keep].flatten()} if kl_bound else {}),  # (B * T',)
    )
    images = pipe.vae.decode(x.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return transitions, pipe.image_processor.postprocess(images.float(), output_type="pt")


# ---- Reward r(x_0, z): rewards.py's (the paper's ImageReward), shapes.py's (offline), or a user's
def reward_and_measures(spec, device, prompts):
    """The reward --reward names, fn(images (B, 3, H, W) in [0, 1], B prompts) -> B scores, and
    the held-out measures {name: fn} scored beside it, never trained on (rewards.py finds them)."""
    try:
        return beside("rewards").load(spec, device, prompts)
    except Exception as e:  # no such file, module or function; a wrong shape; offline
        raise UsageError(f"--reward {spec}: {(str(e) or type(e).__name__).splitlines()[0][:200]}")


# ---- Value function V(x_t, z, t) (official code, v_flag = 1): a baseline for the advantage.
class ValueFunction(nn.Module):
    """The official `ValueMulti`: on [flattened x_t, text feature of z (deviation 7)] three layers
    ReLU(Embedding(t) * Linear(h)), embeddings U(0, 1), weights xavier-normal; a linear head."""

    def __init__(self, latent_dim, text_dim, steps, width=256):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(latent_dim + text_dim, width),
                                     nn.Linear(width, width), nn.Linear(width, width)])
        self.step_embeddings = nn.ModuleList([nn.Embedding(steps, width) for _ in range(3)])
        self.head = nn.Linear(width, 1)
        for linear in (*self.layers, self.head):
            nn.init.xavier_normal_(linear.weight)
        for embedding in self.step_embeddings:
            nn.init.uniform_(embedding.weight)

    def forward(self, latents, text, step):
        h = torch.cat([latents.flatten(1).float(), text.float()], dim=1)
        for layer, embedding in zip(self.layers, self.step_embeddings):
            h = F.relu(embedding(step) * layer(h))
        return self.head(h).squeeze(1)


# ---- Losses (paper Sec. 4, the KL-regularised objective; official train_online_pg.py).
def kl_regulariser(eps, eps_pre):
    """Official KL surrogate: mean over dims of (eps_theta - eps_pre)^2 (deviation 2)."""
    return ((eps - eps_pre) ** 2).mean(dim=(1, 2, 3))


def plus_kl(loss, stats, unet, eps, pretrained_eps, kl_beta):
    """The batch mean of a loss + beta * KL regulariser to pretrained_eps(), the same prediction
    with the adapters off (not computed at beta = 0: no second UNet pass), and the stats."""
    if kl_beta > 0:
        with pretrained_model(unet), torch.no_grad():
            eps_pre = pretrained_eps()
        kl = kl_regulariser(eps, eps_pre)  # its gradient: through eps_theta alone
        loss, stats = loss + kl_beta * kl, dict(stats, kl=kl.mean().item())
    return loss.mean(), dict(stats, loss=loss.mean().item())


def kl_step_weight(scheduler, timestep, eta):
    """c_t^2 / (2 sigma_t^2): KL(N(mu_theta, s^2) || N(mu_pre, s^2)) = this * (eps diff)^2,
    with c_t = sqrt(1 - a_prev - sigma^2) - sqrt(a_prev) sqrt(1 - a_t) / sqrt(a_t)."""
    a_t, a_prev, sigma = ddim_coefficients(scheduler, timestep, eta)
    c = (1 - a_prev - sigma**2).sqrt() - a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt()
    return c**2 / (2 * sigma**2)


def policy_loss(unet, scheduler, batch, text, args):
    """DPOK's per-transition loss (official form, deviation 3):
        -alpha * A * clamp(p_theta(x_{t-1}|x_t) / p_old(x_{t-1}|x_t), 1 - c, 1 + c) + beta * KL_t
    with the batch's advantage A: the policy gradient of Sec. 4, importance-weighted for
    transitions an earlier policy sampled, plus the gradient of the online KL of Sec. 4.
    Transitions marked `on_policy` were sampled by the very weights scored now: their p_old is
    this pass's own log-prob, detached, so their ratio is exactly 1 in any dtype, device and
    batch shape, and their gradient is the on-policy one (deviation 6)."""
    x_t, t, index = batch["latents"], batch["timesteps"], batch["prompt_index"]
    eps = guided_eps(unet, scheduler, x_t, t, text, index, args.guidance)
    _, log_prob = ddim_step_logprob(scheduler, eps, t, x_t, args.eta, prev_sample=batch["next_latents"])
    on_policy = batch["on_policy"]
    ratio = torch.exp(log_prob - torch.where(on_policy, log_prob.detach(), batch["log_prob"]))
    clipped = ratio.clamp(1 - args.ratio_clip, 1 + args.ratio_clip)
    loss = -args.reward_alpha * batch["advantage"] * clipped
    # What the rollout's stored log-prob would have given them: the rollout-vs-update rounding
    gap = torch.where(on_policy, torch.exp(log_prob.detach() - batch["log_prob"]) - 1, 0).abs()
    stats = dict(ratio=ratio.mean().item(), clipfrac=(ratio != clipped).float().mean().item(),
                 max_rescore_gap=gap.max().item(), advantage=batch["advantage"].mean().item())
    return plus_kl(loss, stats, unet, eps, lambda: guided_eps(unet, scheduler, x_t, t, text, index,
                                                              args.guidance), args.kl_beta)


def accumulate_gradient(loss_fn, batch, batch_size, scaler=None):
    """Backward the mean loss over `batch` in micro-batches of `batch_size`, each weighted by its
    share of the batch: the summed gradient is the full batch's exactly, whatever the slicing.
    Returns the batch-mean of the stats that loss_fn reports (the max of a max_ stat)."""
    n, stats = len(batch["reward"]), {}
    for start in range(0, n, batch_size):
        micro = {k: v[start:start + batch_size] for k, v in batch.items()}
        share = len(micro["reward"]) / n
        loss, micro_stats = loss_fn(micro)
        (scaler.scale(loss * share) if scaler else loss * share).backward()
        for k, v in micro_stats.items():  # a max_ stat is the largest, the rest their mean
            stats[k] = max(stats.get(k, v), v) if k.startswith("max_") else stats.get(k, 0.0) + v * share
    return stats


# ---- Several processes (torchrun): own samples and buffer per rank; gradients averaged over ranks
def world():
    """(rank, number of processes); (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def say(message, lead=""):  # rank 0 alone speaks; RANK is set before the process group is
    if os.environ.get("RANK", "0") == "0":
        print(f"{lead}dpok: {message}", file=sys.stderr)


def average_over_ranks(stats, params):
    """The accumulated gradients of `params` and the `stats`, averaged over ranks in place. Every
    rank accumulates an equal share of transitions, so this is the gradient of one process on
    the union of all ranks' transitions. A non-finite stat on one rank reaches every rank; a
    max_ stat is the largest of the ranks'."""
    if not dist.is_initialized():
        return stats
    for grad in (p.grad for p in params):
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    ranks = all_gather(torch.tensor([list(stats.values())], device=params[0].device))  # (R, stats)
    return {k: (v.max() if k.startswith("max_") else v.mean()).item() for k, v in zip(stats, ranks.T)}


def all_gather(tensor):
    """Every rank's `tensor`, concatenated in rank order."""
    return torch.cat(dist_nn.all_gather(tensor)) if dist.is_initialized() else tensor


# ---- One DPOK iteration (the paper's Algorithm 1; README "The official code").
def setup(args, prompts):
    """What a training run holds: the models and their optimizers, the buffer, the RNG state."""
    reward_fn, measures = reward_and_measures(args.reward, args.device, prompts)  # bad input first
    torch.manual_seed(args.seed)  # LoRA and value-function initialisation
    pipe = load_pipeline(args)
    params = add_lora(pipe.unet, args.lora_rank)  # the trainable weights
    text, text_features = encode_prompts(pipe, prompts)  # {name: (P + 1, ...)}, (P, D)
    latent_dim = pipe.unet.config.in_channels * pipe.unet.config.sample_size**2
    value_fn = None if args.no_value or args.supervised else ValueFunction(
        latent_dim, text_features.shape[-1], args.steps).to(args.device)
    return SimpleNamespace(
        pipe=pipe, prompts=prompts, text=text, text_features=text_features,
        reward_fn=reward_fn, measures=measures,
        optimizer=torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),  # official: no decay
        scaler=torch.amp.GradScaler(torch.device(args.device).type, enabled=args.dtype == "float16"),
        params=params, value_fn=value_fn,  # V's optimizer: torch's default weight decay (official)
        value_opt=value_fn and torch.optim.AdamW(value_fn.parameters(), lr=args.value_lr),
        generator=torch.Generator().manual_seed(args.seed + world()[0]),  # every later draw
        buffer=None, prompt_queue=[],  # transitions, each key (N, ...); the rest of a prompt pass
        said=set())  # what watch() has said


def next_prompts(run, n):
    """This rank's share of rank 0's next n x ranks prompts from shuffled passes over the prompt
    list (the official data iterator): distinct within an iteration while there are enough."""
    rank, size = world()
    chosen = []
    while len(chosen) < n * size:
        if not run.prompt_queue:
            run.prompt_queue = torch.randperm(len(run.prompts), generator=run.generator).tolist()
        # a prompt already chosen in this iteration waits for the next one, unless all were
        pick = next((i for i in run.prompt_queue if i not in chosen), run.prompt_queue[0])
        run.prompt_queue.remove(pick)
        chosen.append(pick)
    chosen = torch.tensor(chosen, device=run.text_features.device)
    if dist.is_initialized():
        dist.broadcast(chosen, src=0)
    return chosen[rank * n:(rank + 1) * n]


def score(run, images, prompt_index, measured=True):
    """r(x_0, z) of this rank's images and all ranks' (non-finite: all stop); measures' means."""
    prompts = [run.prompts[i] for i in prompt_index]
    with torch.no_grad():
        rewards = run.reward_fn(images, prompts).float().to(run.text_features.device)
        measures = {name: all_gather(fn(images, prompts).float().to(rewards.device)).mean().item()
                    for name, fn in run.measures.items() if measured}
    everyone = all_gather(rewards)
    check_finite("reward", everyone.sum().item())
    return rewards, everyone, measures


def sample_batch(buffer, size, generator):
    """`size` distinct random transitions of the buffer (all of them if it holds fewer)."""
    idx = torch.randperm(len(buffer["reward"]), generator=generator)[:size]
    return {k: v[idx.to(v.device)] for k, v in buffer.items()}


def update(run, batch, loss_fn, args):
    """One AdamW step of the LoRA weights on the mean loss over `batch` (accumulated over
    micro-batches of batch_size), its gradient norm clipped to clip_norm (official)."""
    run.optimizer.zero_grad(set_to_none=True)
    stats = average_over_ranks(accumulate_gradient(loss_fn, batch, args.batch_size, run.scaler),
                               run.params)
    check_finite("loss", stats["loss"])
    run.scaler.unscale_(run.optimizer)
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(run.params, args.clip_norm).item()
    if not run.scaler.is_enabled():  # under fp16 the scaler skips steps with inf gradients
        check_finite("gradient norm", stats["grad_norm"])
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return stats


def update_value_function(run, args):
    """ONE AdamW step on the MSE gradient accumulated over value_steps random batches of
    value_batch_size buffer transitions, each backward of loss / value_steps (official)."""
    run.value_opt.zero_grad(set_to_none=True)
    mse = 0.0
    for _ in range(args.value_steps):
        batch = sample_batch(run.buffer, args.value_batch_size, run.generator)
        v = run.value_fn(batch["latents"], run.text_features[batch["prompt_index"]], batch["step"])
        loss = F.mse_loss(v, batch["reward"])  # regressed on the final reward
        (loss / args.value_steps).backward()
        mse += loss.item() / args.value_steps
    mse = average_over_ranks(dict(mse=mse), list(run.value_fn.parameters()))["mse"]
    check_finite("value loss", mse)
    run.value_opt.step()
    return mse


def dpok_iteration(run, args):
    """One outer iteration of DPOK; returns its metrics and images."""
    # 1. Rollout: samples_per_iter images from the current policy p_theta, every transition with
    #    its old log-prob; score each x_0 with r(x_0, z) and give every transition its reward.
    prompt_index = next_prompts(run, args.samples_per_iter)
    transitions, images = rollout(run.pipe, run.text, prompt_index, args, run.generator)
    rewards, everyone, measures = score(run, images, prompt_index)
    transitions["reward"] = rewards.repeat_interleave(len(transitions["log_prob"]) // len(rewards))
    # 2. FIFO buffer of the last buffer_size transitions.
    run.buffer = {k: (v if run.buffer is None else torch.cat([run.buffer[k], v]))[-args.buffer_size:]
                  for k, v in transitions.items()}
    # 3. Value function V(x_t, z, t): one step towards the final rewards in the buffer.
    value_mse = None if run.value_fn is None else update_value_function(run, args)
    # 4. Policy: policy_steps updates on random buffer transitions, with the advantage
    #    A = r - V(x_t, z, t) of the just-updated V (no V: A = r), centred over the batch of all
    #    ranks: V's error in the mean would push every sampled step alike (deviation 10).
    updates = []
    for _ in range(args.policy_steps):
        batch = sample_batch(run.buffer, args.grad_accum * args.batch_size, run.generator)
        with torch.no_grad():
            batch["advantage"] = batch["reward"] - (0.0 if run.value_fn is None else run.value_fn(
                batch["latents"], run.text_features[batch["prompt_index"]], batch["step"]))
            if not args.official_advantage:
                batch["advantage"] -= all_gather(batch["advantage"]).mean()
        updates.append(update(run, batch, lambda micro: policy_loss(
            run.pipe.unet, run.pipe.scheduler, micro, run.text, args), args))
        run.buffer["on_policy"].zero_()  # theta has moved: from now on the stored log-prob is p_old
    return iteration_metrics(everyone, measures, updates, value_mse), images


def iteration_metrics(rewards, measures, updates, value_loss=None):
    """The iteration's samples' (all ranks') reward and measures; its update stats' means (or max)."""
    stats = {k: [u[k] for u in updates] for k in updates[0]}
    return dict(reward_mean=rewards.mean().item(), **measures,
                reward_std=rewards.std().item() if len(rewards) > 1 else 0.0,  # 1 image: no spread
                **{"kl": None, **{k: max(v) if k.startswith("max_") else sum(v) / len(v)
                                  for k, v in stats.items()}}, value_loss=value_loss)


def check_finite(name, value):  # before the optimizer step, so the model is still a good one
    if not math.isfinite(value):
        raise TrainingStopped(f"non-finite {name} ({value}); stopped, the last checkpoint in --out "
                              "is the last good state", 1)


# ---- Supervised baseline (paper Sec. 4.2): reward-weighted denoising on fixed samples, KL-O
@torch.no_grad()
def collect_supervised_data(run, args):
    """--supervised-samples images per prompt (per rank) from the pretrained model, scored once;
    the loss needs non-negative weights: rewards min-max normalised to [0, 1] (deviation 9)."""
    index = torch.arange(len(run.prompts), device=run.text_features.device).repeat_interleave(
        args.supervised_samples)
    latents, scores = [], []
    with pretrained_model(run.pipe.unet):
        for chunk in tqdm(index.split(args.samples_per_iter), desc="sampling data", leave=False,
                          disable=world()[0] > 0):  # rank 0's bar only
            transitions, images = rollout(run.pipe, run.text, chunk, args, run.generator)
            latents.append(transitions["next_latents"].unflatten(0, (len(chunk), -1))[:, -1])  # x_0
            scores.append(score(run, images, chunk, measured=False)[:2])
    rewards, everyone = (torch.cat(s) for s in zip(*scores))  # this rank's, all ranks'
    weight = (rewards - everyone.min()) / (everyone.max() - everyone.min()).clamp(min=1e-12)
    say(f"supervised data: {len(everyone)} images, reward {everyone.mean():.4f} +- {everyone.std():.4f}")
    return dict(latents=torch.cat(latents), prompt_index=index, reward=weight)


def supervised_loss(unet, scheduler, batch, text, args, generator):
    """alpha * w(r) * ||n - eps_theta(x_t, t, z)||^2 + beta * ||eps_theta - eps_pre||^2 on
    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) n with t uniform, n ~ N(0, I) (paper Sec. 4.2).
    Conditional eps predictions (unet_eps; no guidance, deviation 9), as in fine-tuning."""
    x0, index = batch["latents"], batch["prompt_index"]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    eps = unet_eps(unet, scheduler, x_t, t, text, index)
    denoise = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    loss = args.reward_alpha * batch["reward"] * denoise
    return plus_kl(loss, dict(denoise=denoise.mean().item()), unet, eps,
                   lambda: unet_eps(unet, scheduler, x_t, t, text, index), args.kl_beta)


def supervised_iteration(run, args):
    """The baseline's iteration, step for step beside dpok_iteration."""
    # 1. Fresh samples of the current model, only to measure the reward as DPOK's iterations do.
    prompt_index = next_prompts(run, args.samples_per_iter)
    _, images = rollout(run.pipe, run.text, prompt_index, args, run.generator)
    _, everyone, measures = score(run, images, prompt_index)
    # 2. policy_steps updates on random batches of the fixed data set (no buffer, no value).
    updates = []
    for _ in range(args.policy_steps):
        batch = sample_batch(run.buffer, args.grad_accum * args.batch_size, run.generator)
        updates.append(update(run, batch, lambda micro: supervised_loss(
            run.pipe.unet, run.pipe.scheduler, micro, run.text, args, run.generator), args))
    return iteration_metrics(everyone, measures, updates), images


# ---- The run around the iterations: output folder, checkpoints and resume, signals, logging.
def save_lora(unet, out):
    """LoRA weights in diffusers' format: StableDiffusionPipeline.load_lora_weights(out) loads them.
    Written in a temporary folder and renamed, so a crash never leaves a half-written file."""
    name = "pytorch_lora_weights.safetensors"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
        # a copy is an ordinary file (mode from the umask); safetensors writes its files 0600
        shutil.copyfile(os.path.join(tmp, name), os.path.join(tmp, "copy"))
        os.replace(os.path.join(tmp, "copy"), os.path.join(out, name))


class TrainingStopped(Exception):
    """(message, exit code): stopped on purpose (signal: 128 + signum) or on a non-finite value (1)."""


STATEFUL = ("optimizer", "scaler", "value_fn", "value_opt")  # saved by their state_dict
# Flags that do not change the algorithm: a resumed run may change them.
RESUMABLE = {"iterations", "out", "resume", "overwrite", "save_every", "grid_every", "device"}
OUTPUTS = ("metrics.jsonl", "checkpoint.pt", "pytorch_lora_weights.safetensors", "samples_",
           "reward_curve.png", "best")


def check_writable(out):
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out} is not a writable folder")


def check_out(args):
    """Fail on an unusable --out before any work, and write nothing there on bad input."""
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    previous = os.path.exists(os.path.join(args.out, "metrics.jsonl")) or os.path.exists(checkpoint)
    if args.resume and not os.path.isfile(checkpoint):
        raise UsageError(f"--resume: no checkpoint.pt in {args.out}")
    if previous and not (args.resume or args.overwrite):
        raise UsageError(f"--out {args.out} holds a previous run; add --resume to continue it or "
                         "--overwrite to replace it")
    check_writable(args.out)
    if args.resume:
        try:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
            saved_args = saved["args"]
        except Exception as e:  # truncated or not ours: say so instead of a traceback
            raise UsageError(f"--resume: cannot read {checkpoint} ({type(e).__name__})")
        for name, value in saved_args.items():
            if name not in RESUMABLE and getattr(args, name) != value:
                raise UsageError(f"--resume: {flag(name)} was {value!r} in the checkpoint, now "
                                 f"{getattr(args, name)!r}; resume with the same value")
        if len(saved["ranks"]) != world()[1]:  # each rank continues its own buffer and RNG
            raise UsageError(f"--resume: the checkpoint was written by {len(saved['ranks'])} "
                             f"process(es), this run has {world()[1]}")
        return saved
    if previous and world()[0] == 0:  # --overwrite: remove what an earlier run wrote, nothing else
        for name in os.listdir(args.out):
            if name.startswith(OUTPUTS):
                path = os.path.join(args.out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return None


def save_checkpoint(run, args, iteration):
    """Everything a resumed run needs to continue bit for bit, every rank's buffer and RNG state
    included; rank 0 writes it atomically (tmp + rename). Called by all ranks."""
    rank, size = world()
    mine = dict(buffer={k: v.cpu() for k, v in run.buffer.items()}, prompt_queue=run.prompt_queue,
                generator=run.generator.get_state())
    ranks = [mine] if size == 1 else [None] * size if rank == 0 else None  # rank 0 gathers all
    if size > 1:
        dist.gather_object(mine, ranks)
    error = None
    if rank == 0:
        path = os.path.join(args.out, "checkpoint.pt")
        state = dict(
            iteration=iteration, args=dataclasses.asdict(args), ranks=ranks,
            lora={n: p.detach() for n, p in run.pipe.unet.named_parameters() if p.requires_grad},
            **{name: getattr(run, name) and getattr(run, name).state_dict() for name in STATEFUL})
        try:
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
            save_lora(run.pipe.unet, args.out)
        except OSError as e:  # disk full, folder removed: the previous checkpoint is still whole
            error = str(e)
    if all_gather(torch.tensor([float(error is not None)], device=args.device)).any():
        raise TrainingStopped(f"cannot write the checkpoint in {args.out} ({error}); the "
                              "previous one is intact", 1)


def watch(history, run, args, window=10):
    """Rank 0, after every iteration. Keeps in --out/best the LoRA of the best mean reward over
    `window` iterations so far (one iteration's samples are too few to choose by). Says once what
    went wrong: rounding beyond the ratio clip (deviation 6); a collapse, when the last window's
    samples scored nearly alike (mean spread under a tenth of iteration 0's; healthy runs keep over
    half) or their mean fell below the best, or the pretrained model's, by iteration 0's spread."""
    notes, gap = {}, history[-1].get("max_rescore_gap", 0)
    if gap > args.ratio_clip:
        notes["rounding"] = (
            f"note: {args.dtype} rounds the rollout and the update apart by {gap:.1e}, beyond "
            f"--ratio-clip {args.ratio_clip:g}: later updates clip by rounding alone; use "
            f"--batch-size {args.samples_per_iter} (the rollout's shape) or --dtype float32")
    if len(history) >= window:
        means = torch.tensor([m["reward_mean"] for m in history]).unfold(0, window, 1).mean(1)
        if means[-1] == means.max():
            with contextlib.suppress(OSError):  # a full disk: the next checkpoint stops the run
                os.makedirs(os.path.join(args.out, "best"), exist_ok=True)
                save_lora(run.pipe.unet, os.path.join(args.out, "best"))
        best, spread = max(means.max().item(), history[0]["reward_mean"]), history[0]["reward_std"]
        alike = sum(m["reward_std"] for m in history[-window:]) / window < 0.1 * spread
        if spread > 0 and (alike or means[-1] < best - spread):  # one image: no spread to judge by
            notes["collapse"] = (
                f"warning: the run looks collapsed at iteration {history[-1]['iteration']}: "
                + (f"for {window} iterations its samples scored nearly alike" if alike else
                   f"the mean reward of {window} iterations fell to {means[-1]:.3f} from "
                   f"{best:.3f}") + "; try a larger --kl-beta or a smaller --lr. The LoRA "
                f"of the best {window}-iteration mean reward is in {args.out}/best")
    for kind, message in notes.items():
        if kind not in run.said:
            run.said.add(kind)
            say(message, "\n")


def stop_now(signum, frame):
    raise TrainingStopped(f"{signal.Signals(signum).name}: stopped at once; checkpoints already "
                          "in --out are kept", 128 + signum)


def train(args):
    prompts = read_prompts(args)
    saved = check_out(args)
    run = setup(args, prompts)
    rank, size = world()
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    history, first = [], 0
    if saved is not None:  # resume: restore every state, drop metrics of unsaved iterations
        run.pipe.unet.load_state_dict(saved["lora"], strict=False)
        for name in STATEFUL:
            if getattr(run, name) is not None:
                getattr(run, name).load_state_dict(saved[name])
        mine, first = saved["ranks"][rank], saved["iteration"]
        run.generator.set_state(mine["generator"])
        run.buffer = {k: v.to(args.device) for k, v in mine["buffer"].items()}
        run.prompt_queue = mine["prompt_queue"]
        if rank == 0:
            with open(metrics_path) as f:
                history = [m for m in map(json.loads, f) if m["iteration"] < first]
            with open(metrics_path, "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in history)
    elif args.supervised:  # the baseline's fixed data set plays the buffer's part
        run.buffer = collect_supervised_data(run, args)
    say(f"{args.model} on {args.device} ({args.dtype}{f', {size} processes' * (size > 1)}), "
        f"reward {args.reward}, {len(prompts)} prompt(s), {len(run.params)} LoRA tensors "
        f"({sum(p.numel() for p in run.params):,} weights)"
        + (f"; resuming at iteration {first}" if saved else ""))
    iterate = supervised_iteration if args.supervised else dpok_iteration

    # First SIGINT/SIGTERM: finish the iteration in flight, save, exit. A second: stop at once.
    stop = []

    def request_stop(signum, frame):
        if stop:
            stop_now(signum, frame)
        stop.append(signum)

    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        bar = tqdm(range(first, args.iterations), desc="dpok", dynamic_ncols=True,
                   initial=first, total=args.iterations, disable=rank > 0)
        for iteration in bar:
            start = time.time()
            metrics, images = iterate(run, args)
            metrics = dict(iteration=iteration, **metrics, seconds=time.time() - start)
            history.append(metrics)
            if rank == 0:  # metrics (of all ranks), rank 0's images, the progress bar
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if iteration % args.grid_every == 0 or iteration == args.iterations - 1:
                    save_image(images, os.path.join(args.out, f"samples_{iteration:05d}.png"),
                               nrow=math.ceil(math.sqrt(len(images))))
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=metrics["kl"])
                watch(history, run, args)
            # a signal to any rank stops every rank after this same iteration
            signum = int(all_gather(torch.tensor(stop[:1] or [0], device=args.device)).max())
            if signum or (iteration + 1) % args.save_every == 0 or iteration + 1 == args.iterations:
                save_checkpoint(run, args, iteration + 1)
            if signum:
                raise TrainingStopped(
                    f"{signal.Signals(signum).name}: saved iteration {iteration + 1} to "
                    f"{args.out}/checkpoint.pt; continue with the same command and --resume",
                    128 + signum)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if rank == 0:
        plot_curves(history, os.path.join(args.out, "reward_curve.png"),
                    ["reward_mean", *run.measures, "kl", *["max_rescore_gap"][:not args.supervised]])
        kl = "off" if history[-1]["kl"] is None else format(history[-1]["kl"], ".2e")
        print(f"dpok: reward {history[0]['reward_mean']:.4f} -> {history[-1]['reward_mean']:.4f} "
              f"over {len(history)} iterations (KL {kl}); LoRA weights and metrics in {args.out}")
    return history


def plot_curves(history, path, keys):
    """The metrics `keys` per iteration, one panel each, as a PNG (no display needed)."""
    from matplotlib.figure import Figure  # imported here: only a finished run draws

    figure = Figure(figsize=(6, 2 + 1.5 * len(keys)))
    for ax, key in zip(figure.subplots(len(keys), 1, sharex=True), keys):
        ax.plot(*zip(*[(m["iteration"], m[key]) for m in history if m[key] is not None]))
        ax.set(ylabel=key)
        ax.grid(alpha=0.3)
    figure.supxlabel("iteration")
    figure.savefig(path, dpi=100, bbox_inches="tight")


# ---- Evaluation: pretrained vs fine-tuned on the same seeds; the fine-tuned model's KL bound
@torch.no_grad()
def evaluate(args):
    prompts = read_prompts(args)
    check_writable(args.out)  # eval.json and eval.png may go beside the run they evaluate
    reward_fn, measures = reward_and_measures(args.reward, args.device, prompts)
    pipe = load_pipeline(args)
    scorers = dict(reward=reward_fn, **measures)
    try:
        pipe.load_lora_weights(args.eval)
    except Exception as e:
        raise UsageError(f"--eval {args.eval}: cannot load LoRA weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]})")
    text, _ = encode_prompts(pipe, prompts)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for p, prompt in enumerate(tqdm(prompts, desc="eval")):
        # Two generators with one seed: both models start from the same noise, chunk by chunk.
        seeds = [torch.Generator().manual_seed(args.seed) for _ in range(2)]
        before, after, kl = [], [], []
        for chunk in torch.full((args.eval_samples,), p, device=args.device).split(args.samples_per_iter):
            with pretrained_model(pipe.unet):
                before.append(rollout(pipe, text, chunk, args, seeds[0])[1])
            # Summed over t, the steps' KL bounds KL(p_theta(x_0|z) || p_pre(x_0|z)) (paper's lemma)
            transitions, images = rollout(pipe, text, chunk, args, seeds[1], kl_bound=True)
            after.append(images)
            kl.append(transitions["kl"])
        grid = "eval.png" if len(prompts) == 1 else f"eval_{p:03d}.png"  # one per prompt: readable
        save_image(torch.cat(before + after), os.path.join(args.out, grid), nrow=args.eval_samples)
        rows.append(dict(prompt=prompt, kl_bound=torch.cat(kl).sum().item() / args.eval_samples))
        for name, fn in scorers.items():
            pre, fine = (fn(torch.cat(x), [prompt] * args.eval_samples).float() for x in (before, after))
            gain = fine - pre  # paired: the same seeds, so its error is the pairs'
            rows[-1].update({f"{name}_pretrained": pre.mean().item(),
                             f"{name}_finetuned": fine.mean().item(), f"{name}_gain": gain.mean().item(),
                             f"{name}_gain_se": gain.std().item() / len(gain) ** 0.5})
    # The prompts file's mean row (a group: trained, unseen...); SEs: of a mean of independent gains
    mean = dict(prompt=f"mean of {len(rows)} prompts", **{
        k: (sum(r[k] ** 2 for r in rows) ** 0.5 if k.endswith("_se") else sum(r[k] for r in rows))
        / len(rows) for k in rows[0] if k != "prompt"})
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(dict(args=dataclasses.asdict(args), results=rows, mean=mean), f, indent=1)
    for r in rows + [mean] * (len(rows) > 1):  # the gain's error: the standard error of the pairs
        print(f"{r['prompt']} (pretrained -> fine-tuned, gain +- SE): " + "".join(
            f"{n} {r[n + '_pretrained']:.4f} -> {r[n + '_finetuned']:.4f} ({r[n + '_gain']:+.4f} +- "
            f"{r[n + '_gain_se']:.4f}), " for n in scorers) + f"KL bound {r['kl_bound']:.1f} nats")
    print(f"dpok: eval of {args.eval} in {args.out}: eval.json, {grid.replace(f'{p:03d}', 'NNN')} "
          "(a grid per prompt: pretrained samples above the fine-tuned ones, same seeds)")
    return rows


# ---- Command line: parsing, every bad input as one line with exit code 2, main.
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input (argparse adds the usage)
        raise UsageError(message)


def flag(name):
    return "--" + name.replace("_", "-")


COUNTS = [f.name for f in dataclasses.fields(Args) if f.type is int and f.name != "seed"]
# Flags that a mode never reads: giving one there is a mistake to report, not to ignore.
VALUE = {"value_steps", "value_batch_size", "value_lr"}
RL = {"ratio_clip", "buffer_size", "no_value", "official_advantage", *VALUE}  # DPOK's update alone
UNUSED = {
    "eval": {"iterations", "policy_steps", "grad_accum", "batch_size", "lr", "clip_norm", "lora_rank",
             "reward_alpha", "kl_beta", "grid_every", "save_every", "resume", "overwrite",
             "supervised", *RL},
    "supervised": RL,
    "no_value": VALUE,
    "tiny": {"model"},
    "resume": {"overwrite"},  # it continues the run in --out, --overwrite would replace it
}
NEEDS = {"supervised_samples": "supervised", "eval_samples": "eval"}


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Args):
        shown = f.default is not None and f.type is not bool
        default = f" (default {f.default})" if shown else ""
        kind = dict(action="store_true") if f.type is bool else dict(type=f.type,
                                                                     choices=f.metadata["choices"])
        parser.add_argument(flag(f.name), help=f.metadata["help"] + default, **kind)
    given = vars(parser.parse_args(argv))
    tiny = beside("shapes").TINY_DEFAULTS if given.get("tiny") else {}  # deviation 8
    args = Args(**{**tiny, **given})
    check_args(args, set(given))
    return args


def check_args(args, given):
    """Every value a user can type, decided before any model is loaded."""
    def bad(msg):
        raise UsageError(msg)

    if (args.prompt is None) == (args.prompts is None):
        bad("give exactly one of --prompt TEXT or --prompts FILE")
    for name in ("prompt", "prompts", "model", "out", "eval"):
        if getattr(args, name) is not None and not getattr(args, name).strip():
            bad(f"{flag(name)} is empty")
    for mode, unused in UNUSED.items():
        for name in sorted(unused & given) if getattr(args, mode) else []:  # the first one
            bad(f"{flag(name)} has no effect with {flag(mode)}; drop one of them")
    for name, mode in NEEDS.items():
        if name in given and not getattr(args, mode):
            bad(f"{flag(name)} is only used with {flag(mode)}")
    for name in COUNTS:
        if not 0 < getattr(args, name) < 2**31:
            bad(f"{flag(name)} must be a positive whole number below 2^31, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**63:
        bad(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.eval and args.eval_samples < 2:
        bad("--eval-samples must be at least 2 (the table reports a standard deviation)")
    for name in ("guidance", "kl_beta", "lr", "clip_norm", "reward_alpha", "ratio_clip", "value_lr"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            bad(f"{flag(name)} must be a finite number >= 0, got {value}")
        if value == 0 and name not in ("guidance", "kl_beta"):  # ratio clip 0: no gradient
            bad(f"{flag(name)} 0 leaves nothing to train")
    if not (math.isfinite(args.eta) and 0 < args.eta <= 1):
        bad(f"--eta must be in (0, 1], got {args.eta}: 0 makes DDIM deterministic (no step has a "
            "log-probability, DPOK needs eta > 0), above 1 its variance exceeds the step's")
    if args.batch_size * args.grad_accum > args.buffer_size:
        bad(f"--batch-size x --grad-accum ({args.batch_size * args.grad_accum}) exceeds "
            f"--buffer-size ({args.buffer_size})")
    if args.eval and not os.path.isfile(os.path.join(args.eval, "pytorch_lora_weights.safetensors")):
        bad(f"--eval {args.eval}: no pytorch_lora_weights.safetensors there")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        bad(f"unknown --device {args.device!r}; use cpu, cuda or cuda:N")
    if "LOCAL_RANK" in os.environ:  # torchrun: each process takes the GPU of its local rank
        if args.eval:
            bad("--eval runs in one process: start it with python, not torchrun")
        if args.device not in ("cpu", "cuda"):
            bad("under torchrun give --device cuda (each process uses its local rank's GPU) or cpu")
        args.device = args.device.replace("cuda", f"cuda:{os.environ['LOCAL_RANK']}")
    gpu = None if args.device == "cpu" else (torch.device(args.device).index or 0)
    if gpu is not None and gpu >= torch.cuda.device_count():
        bad(f"--device {args.device} asked for, but this machine has {torch.cuda.device_count()} "
            "CUDA GPU(s); use --device cpu")
    if args.dtype is None:
        args.dtype = "float32" if gpu is None else "float16"  # official; bfloat16 rounds past the clip


def read_prompts(args):
    if args.prompt is not None:
        return [args.prompt.strip()]
    try:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:  # missing, a folder, unreadable, not text
        raise UsageError(f"cannot read prompts file {args.prompts}: "
                         f"{getattr(e, 'strerror', 'not UTF-8 text')}")
    if not prompts:
        raise UsageError(f"prompts file has no prompts: {args.prompts}")
    return prompts


def main(argv=None):
    for library in (diffusers, transformers):  # our own one-line messages say what went wrong
        library.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()  # loading: an error after it stays one line
    # Outside the training loop (loading, data collection, eval) a signal stops at once.
    handlers = {sig: signal.signal(sig, stop_now) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        args = parse_args(argv)
        if "WORLD_SIZE" in os.environ:  # launched by torchrun: one process per GPU (CPU: gloo)
            if args.device != "cpu":
                torch.cuda.set_device(args.device)
            dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
        evaluate(args) if args.eval else train(args)
    except UsageError as e:  # every rank decides alike; rank 0 says it
        say(f"error: {e}")
        return 2
    except TrainingStopped as e:
        say(e.args[0], "\n")
        return e.args[1]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
