"""DPOK: online RL fine-tuning of a text-to-image diffusion model with a KL penalty.

Fan et al., "DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion Models",
NeurIPS 2023, https://arxiv.org/abs/2305.16381. One file, read top to bottom like the paper:
models -> sampler -> rollout -> rewards -> value function -> losses -> training loop ->
supervised baseline -> evaluation -> CLI.

    python dpok.py --prompt "A green colored rabbit" --kl-beta 0.01     # SD v1.5 + ImageReward, GPU
    python dpok.py --tiny --prompt "a green colored rabbit"             # offline, CPU, ~2 minutes

Where this file departs from the paper / official code (README "Deviations" mirrors this list):
 1. Log-probs are averaged over latent dimensions (mean, not sum), as in the official code and
    DDPO: the sum over ~16k dims turns small changes into overflowing ratios.
 2. The KL regulariser is the official one: mean over dims of (eps_theta - eps_pre)^2 of the
    guided noise, without the per-step weight c_t^2 / (2 sigma_t^2) of the exact Gaussian KL
    (`kl_step_weight` gives it; the tests check the two agree up to that weight).
 3. The ratio term is the official clamp(ratio, 1 - eps, 1 + eps), not PPO's min.
 4. Steps whose sigma_t is 0 (only with `set_alpha_to_one=True`, final step) are deterministic:
    they have no log-prob and are not stored as transitions.
 5. The pretrained reference is the same UNet with the LoRA adapters disabled (no second UNet).
 6. Log-probs and ratios are computed in float32 on the stored float32 latents, even when the
    UNet runs in half precision; the default GPU dtype is bfloat16 (official: fp16).
 7. `--tiny` changes defaults for a random CPU-sized model (see TINY_DEFAULTS): fewer steps,
    lower guidance, a far larger learning rate, a wider ratio clip and alpha scaled to the
    colour reward's spread; its GroupNorms have one group. The algorithm is unchanged.
 8. Supervised baseline: rewards are min-max normalised to [0, 1] (the loss needs non-negative
    weights), and its noise predictions are conditional (no guidance).
"""

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Hyperparameters. Defaults are the official code's (PAPER.md Sec. 3) unless marked otherwise.


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    prompt: str = opt(None, "the single prompt to fine-tune on")
    prompts: str = opt(None, "file with one prompt per line (multi-prompt training)")
    model: str = opt("stable-diffusion-v1-5/stable-diffusion-v1-5", "diffusers model id or path")
    tiny: bool = opt(False, "build a tiny random SD-shaped pipeline in code: offline, CPU")
    reward: str = opt("imagereward", "imagereward (paper) | color | compressibility")
    lora_rank: int = opt(4, "LoRA rank on the UNet attention projections")
    steps: int = opt(50, "DDIM steps T per image (paper Sec. 5)")
    guidance: float = opt(7.5, "classifier-free guidance scale w")
    eta: float = opt(1.0, "DDIM eta; > 0 so that every step is a Gaussian policy (Sec. 4)")
    samples_per_iter: int = opt(10, "images sampled per iteration (g_batch_size)")
    buffer_size: int = opt(1000, "FIFO buffer of the last N transitions")
    policy_steps: int = opt(5, "optimizer steps per iteration (p_step)")
    grad_accum: int = opt(12, "micro-batches accumulated per optimizer step")
    batch_size: int = opt(4, "transitions per micro-batch (p_batch_size)")
    lr: float = opt(1e-5, "AdamW learning rate of the LoRA weights")
    clip_norm: float = opt(0.1, "gradient-norm clip")
    reward_alpha: float = opt(10.0, "alpha: weight of the reward term (reward_weight)")
    kl_beta: float = opt(0.01, "beta: weight of the KL regulariser (kl_weight)")
    ratio_clip: float = opt(1e-4, "importance ratio clamped to [1 - c, 1 + c]")
    no_value: bool = opt(False, "no value function: advantage = reward")
    value_steps: int = opt(5, "value-function AdamW steps per iteration (v_step)")
    value_batch_size: int = opt(256, "transitions per value-function step")
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
    eval: bool = opt(False, "no training: compare --lora against the pretrained model")
    lora: str = opt(None, "folder with pytorch_lora_weights.safetensors, for --eval")
    eval_samples: int = opt(50, "images per prompt for --eval (paper: 50 single, 30 multi-prompt)")
    device: str = opt(None, "cpu | cuda | cuda:N; default cuda if available")
    dtype: str = opt(None, "float32 | bfloat16 | float16; default bfloat16 on GPU (official: "
                     "fp16), float32 on CPU")


# Tiny-world defaults, calibrated on 2 CPU cores (~1 s an iteration): a random model learns only
# with a learning rate far above the paper's 1e-5; at that rate the official 1e-4 ratio clip
# clamps ~60% of transitions (reward 0.06 -> 0.14 in 100 iterations, against 0.21 with 0.2).
# The colour reward varies ~50x less between images than ImageReward (std ~0.02 vs ~1), so
# alpha is scaled by the same factor to keep the paper's balance of reward against KL.
TINY_DEFAULTS = dict(
    reward="color", steps=10, guidance=3.0, samples_per_iter=8, buffer_size=160,
    policy_steps=2, grad_accum=2, batch_size=16, lr=3e-3, ratio_clip=0.2, reward_alpha=500.0,
    value_steps=10, value_batch_size=128, value_lr=1e-3, iterations=100, save_every=25,
    supervised_samples=800, eval_samples=32,
)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input (argparse adds the usage)
        raise UsageError(message)


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Args):
        name, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            parser.add_argument(name, action="store_true", help=help)
        else:
            if f.default is not None:
                tiny = f"; --tiny: {TINY_DEFAULTS[f.name]}" if f.name in TINY_DEFAULTS else ""
                help = f"{help} (default {f.default}{tiny})"
            parser.add_argument(name, type=f.type, help=help)
    given = vars(parser.parse_args(argv))
    args = Args(**{**(TINY_DEFAULTS if given.get("tiny") else {}), **given})
    check_args(args)
    return args


def check_args(args):
    def bad(msg):
        raise UsageError(msg)

    if (args.prompt is None) == (args.prompts is None):
        bad("give exactly one of --prompt TEXT or --prompts FILE")
    if args.prompt is not None and not args.prompt.strip():
        bad("--prompt is empty")
    for name in ("steps", "samples_per_iter", "buffer_size", "policy_steps", "grad_accum",
                 "batch_size", "iterations", "lora_rank", "value_steps", "value_batch_size",
                 "grid_every", "save_every", "supervised_samples", "eval_samples"):
        if getattr(args, name) <= 0:
            bad(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval and args.eval_samples < 2:
        bad("--eval-samples must be at least 2 (the table reports a standard deviation)")
    for name in ("guidance", "eta", "lr", "clip_norm", "reward_alpha", "kl_beta", "ratio_clip",
                 "value_lr"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            bad(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.eta == 0:
        bad("--eta 0 makes DDIM deterministic: no step has a log-probability, DPOK needs eta > 0")
    if args.batch_size * args.grad_accum > args.buffer_size:
        bad(f"--batch-size x --grad-accum ({args.batch_size * args.grad_accum}) exceeds "
            f"--buffer-size ({args.buffer_size})")
    if args.eval != (args.lora is not None):
        bad("--eval needs --lora DIR (and --lora is only used with --eval)")
    if args.eval and args.supervised:
        bad("--eval does not train; drop --supervised")
    if args.lora and not os.path.isfile(os.path.join(args.lora, "pytorch_lora_weights.safetensors")):
        bad(f"--lora {args.lora}: no pytorch_lora_weights.safetensors there")
    if args.reward not in REWARDS:
        bad(f"unknown --reward {args.reward!r}; choose from {', '.join(REWARDS)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        bad(f"unknown --device {args.device!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        bad(f"--device {args.device} asked for, but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        bad(f"unsupported --device {args.device!r}; use cpu, cuda or cuda:N")
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    if args.dtype not in ("float32", "bfloat16", "float16"):
        bad(f"unknown --dtype {args.dtype!r}; use float32, bfloat16 or float16")
    if args.dtype == "float16" and device.type == "cpu":
        bad("--dtype float16 is not supported on CPU; use float32 (or bfloat16)")


def read_prompts(args):
    try:
        if args.prompt is not None:
            prompts = [args.prompt.strip()]
        else:
            with open(args.prompts, encoding="utf-8") as f:
                prompts = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise UsageError(f"prompts file not found: {args.prompts}")
    except UnicodeDecodeError:
        raise UsageError(f"prompts file is not UTF-8 text: {args.prompts}")
    except OSError as e:
        raise UsageError(f"cannot read prompts file {args.prompts}: {e.strerror}")
    if not prompts:
        raise UsageError(f"prompts file has no prompts: {args.prompts}")
    if args.reward == "color":
        [prompt_colour(p) for p in prompts]  # a prompt with no colour word is bad input
    return prompts


# ----------------------------------------------------------------------------------------------
# Models: Stable Diffusion through diffusers, or a tiny random pipeline of the same shape.


def tiny_pipeline(seed=0):
    """A random SD-shaped pipeline built in code: 8x8x4 latents, 64 px images, no download.

    GroupNorm with one group (SD: 32) in the UNet and the VAE: with one group per channel, a
    random model normalises away every per-channel shift, so colour can barely be learned
    (measured: the mean reward did not move in 60 iterations; with one group it triples).

    The tokenizer is CLIP's byte-level BPE with a vocabulary written here (256 bytes, each also
    as a word end, no merges): every prompt tokenises, one token per character.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    torch.manual_seed(seed)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump({token: i for i, token in enumerate(vocab)}, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                                  model_max_length=77)  # SD's context length
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1))
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
        norm_num_groups=1)
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), norm_num_groups=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    # SD v1.5's scheduler: scaled-linear betas, steps_offset 1, final alpha = alphas_cumprod[0].
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def load_pipeline(args):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = getattr(torch, args.dtype)
    if args.tiny:
        pipe = tiny_pipeline(args.seed)
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                args.model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        except Exception as e:  # offline, unknown id, incomplete folder: all end the same way
            raise UsageError(
                f"cannot load model {args.model!r} ({type(e).__name__}); download it once with "
                f"`huggingface-cli download {args.model}` while online, or run offline with --tiny")
        # The paper samples with DDIM (eta = 1); SD v1.5 ships a PNDM scheduler.
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if pipe.scheduler.config.prediction_type != "epsilon" or pipe.scheduler.config.thresholding:
        raise UsageError(f"{args.model}: only epsilon-prediction models without thresholding")
    pipe.to(args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    return pipe


def add_lora(unet, rank):
    """LoRA (Hu et al. 2021) on every attention projection of the UNet; only these train.

    B starts at zero, so the fine-tuned model starts exactly at the pretrained one, and
    `unet.disable_adapters()` gives back the pretrained model for the KL term.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    cast_training_params(unet, torch.float32)  # fp32 master weights under half precision
    return [p for p in unet.parameters() if p.requires_grad]


@torch.no_grad()
def encode_prompts(pipe, prompts):
    """Text embeddings (P, L, D) of the prompts and (1, L, D) of the empty prompt.
    Computed once: LoRA is on the UNet only, so they never change."""
    cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, True)
    return cond, uncond[:1]


# ----------------------------------------------------------------------------------------------
# Sampler: one DDIM step is one Gaussian policy action (PAPER.md Sec. 1, paper Sec. 4).


def ddim_alphas(scheduler, timestep):
    """alphas_cumprod at t and at the previous DDIM timestep (final alpha after the last step)."""
    t = torch.as_tensor(timestep, device=scheduler.alphas_cumprod.device).long().reshape(-1)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod
    # Test before indexing: clamping prev_t first would never use the final alpha (DDPO's bug).
    alpha_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], scheduler.final_alpha_cumprod)
    return alphas[t], alpha_prev


def ddim_sigma(scheduler, timestep, eta):
    """sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev), one per timestep."""
    a_t, a_prev = ddim_alphas(scheduler, timestep)
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()


def ddim_step_logprob(scheduler, model_output, timestep, sample, eta, prev_sample=None,
                      generator=None):
    """One DDIM step p(x_{t-1} | x_t) = N(mu, sigma_t^2 I); returns (x_{t-1}, log p(x_{t-1})).

    Samples x_{t-1} when `prev_sample` is None, else scores the given one (re-scoring stored
    transitions under the current policy). `timestep` is an int or one per sample. The
    log-prob is averaged over latent dimensions (deviation 1); where sigma_t = 0 the step is a
    point mass with no density and its log-prob is reported as 0 (deviation 4).
    """
    model_output, sample = model_output.float(), sample.float()
    a_t, a_prev = (a.to(sample.device).view(-1, 1, 1, 1) for a in ddim_alphas(scheduler, timestep))
    sigma = ddim_sigma(scheduler, timestep, eta).to(sample.device).view(-1, 1, 1, 1)
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
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob.mean(dim=(1, 2, 3))


def guided_eps(unet, latents, timesteps, cond, uncond, guidance):
    """Classifier-free guidance, eps_u + w (eps_c - eps_u), in one UNet call on [uncond; cond].
    Guidance is part of the policy: the log-prob is that of the guided step."""
    n = latents.shape[0]
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(n)
    eps = unet(torch.cat([latents, latents]).to(cond.dtype), torch.cat([timesteps, timesteps]),
               encoder_hidden_states=torch.cat([uncond.expand(n, -1, -1), cond])).sample.float()
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@contextlib.contextmanager
def pretrained_model(unet):
    """The pretrained model p_pre: the same UNet with its LoRA adapters switched off."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


# ----------------------------------------------------------------------------------------------
# Rollout: sample trajectories x_T -> x_0 and store every stochastic transition.


@torch.no_grad()
def rollout(pipe, cond, uncond, prompt_index, args, generator, keep_eps=False):
    """Sample len(prompt_index) images with the current UNet (LoRA on).

    Returns (transitions, images). `transitions` holds, per (image, step) pair, flattened
    image-major: latents x_t, next_latents x_{t-1}, timesteps t, step (0..T-1), prompt_index,
    log_prob (old log-prob, float32, of exactly the stored x_{t-1}), and with keep_eps the guided
    noise eps_theta(x_t) (for evaluation; training recomputes it). images: (B, 3, H, W) in [0, 1].
    """
    scheduler, unet = pipe.scheduler, pipe.unet
    scheduler.set_timesteps(args.steps, device=pipe.device)
    n, size = len(prompt_index), unet.config.sample_size
    x = torch.randn((n, unet.config.in_channels, size, size), generator=generator,
                    device=generator.device).to(pipe.device) * scheduler.init_noise_sigma
    latents, log_probs, eps_seen = [x], [], []
    for t in scheduler.timesteps:
        eps = guided_eps(unet, x, t, cond[prompt_index], uncond, args.guidance)
        x, log_prob = ddim_step_logprob(scheduler, eps, t, x, args.eta, generator=generator)
        latents.append(x)
        log_probs.append(log_prob)
        if keep_eps:
            eps_seen.append(eps)
    latents = torch.stack(latents, dim=1)  # (B, T + 1, 4, h, w)
    steps = len(scheduler.timesteps)
    keep = ddim_sigma(scheduler, scheduler.timesteps, args.eta).to(pipe.device) > 0  # (T,)
    transitions = dict(
        latents=latents[:, :-1][:, keep].flatten(0, 1),  # (B * T', 4, h, w)
        next_latents=latents[:, 1:][:, keep].flatten(0, 1),
        log_prob=torch.stack(log_probs, dim=1)[:, keep].flatten(),  # (B * T',)
        timesteps=scheduler.timesteps[keep].repeat(n),
        step=torch.arange(steps, device=pipe.device)[keep].repeat(n),
        prompt_index=prompt_index.repeat_interleave(int(keep.sum())),
    )
    if keep_eps:
        transitions["eps"] = torch.stack(eps_seen, dim=1)[:, keep].flatten(0, 1)  # (B * T', 4, h, w)
    return transitions, decode(pipe, x)


@torch.no_grad()
def decode(pipe, latents):
    images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images.float(), output_type="pt")  # (B, 3, H, W)


# ----------------------------------------------------------------------------------------------
# Rewards r(x_0, z): ImageReward (the paper's), and two that need no weights.

COLOURS = {  # colour word -> RGB channels that should dominate
    "red": [0], "green": [1], "blue": [2], "yellow": [0, 1], "cyan": [1, 2], "magenta": [0, 2],
    "purple": [0, 2], "pink": [0, 2],
}


def prompt_colour(prompt):
    words = [w.strip(".,;:!?\"'") for w in prompt.lower().split()]
    found = [w for w in words if w in COLOURS]
    if not found:
        raise UsageError(f"--reward color needs a colour word ({', '.join(COLOURS)}) in "
                         f"every prompt; none in {prompt!r}")
    return found[0]


def color_reward(images, prompts):
    """Mean over pixels of (colour channels) - (other channels), in [-1, 1]:
    "a green colored rabbit" -> mean of G - (R + B) / 2."""
    rewards = []
    for image, prompt in zip(images, prompts):
        plus = torch.zeros(3, dtype=torch.bool)
        plus[COLOURS[prompt_colour(prompt)]] = True
        rewards.append(image[plus].mean() - image[~plus].mean())
    return torch.stack(rewards).float().cpu()


def compressibility_reward(images, prompts):
    """DDPO's JPEG compressibility: minus the file size in kB at quality 95."""
    from torchvision.transforms.functional import to_pil_image

    sizes = []
    for image in images:
        buffer = io.BytesIO()
        to_pil_image(image.float().cpu()).save(buffer, format="JPEG", quality=95)
        sizes.append(-buffer.tell() / 1000)
    return torch.tensor(sizes)


def imagereward_reward(device, model=None):
    """ImageReward-v1.0 (Xu et al. 2023), downloaded (~1.7 GB) on first use; `model` lets a test
    pass one built offline. Scores are standardised by the package. Not differentiated."""
    from torchvision.transforms.functional import to_pil_image

    if model is None:
        try:
            with warnings.catch_warnings():  # its `clip` dependency warns about pkg_resources
                warnings.simplefilter("ignore")
                import ImageReward
        except Exception as e:
            raise UsageError(f"--reward imagereward needs the image-reward package ({e}); "
                             "pip install -r requirements.txt")
        try:
            model = ImageReward.load("ImageReward-v1.0", device=device)
        except Exception as e:
            raise UsageError(f"cannot load ImageReward-v1.0 ({type(e).__name__}); it downloads on "
                             "first use, so connect once, or use --reward color/compressibility")

    @torch.no_grad()
    def reward(images, prompts):
        return torch.tensor([float(model.score(p, to_pil_image(im.float().cpu())))
                             for im, p in zip(images, prompts)])

    return reward


REWARDS = {"imagereward": imagereward_reward, "color": lambda device: color_reward,
           "compressibility": lambda device: compressibility_reward}


# ----------------------------------------------------------------------------------------------
# Value function V(x_t, z, t) (official code, v_flag = 1): a baseline for the advantage.


class ValueFunction(nn.Module):
    """MLP on (flattened x_t, mean text embedding); each of its three 256-wide layers is
    scaled by a learned embedding of the step index, as in the official code."""

    def __init__(self, latent_dim, text_dim, steps, width=256):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(latent_dim + text_dim, width),
                                     nn.Linear(width, width), nn.Linear(width, width)])
        self.step_scale = nn.Embedding(steps, 3 * width)
        nn.init.ones_(self.step_scale.weight)
        self.head = nn.Linear(width, 1)

    def forward(self, latents, text, step):
        h = torch.cat([latents.flatten(1).float(), text.mean(1).float()], dim=1)
        for layer, scale in zip(self.layers, self.step_scale(step).chunk(3, dim=1)):
            h = F.silu(layer(h) * scale)
        return self.head(h).squeeze(1)


def value_step(value_fn, value_opt, batch, cond):
    """One regression step of V onto the final reward (MSE), on random buffer transitions."""
    loss = F.mse_loss(value_fn(batch["latents"], cond[batch["prompt_index"]], batch["step"]),
                      batch["reward"])
    value_opt.zero_grad(set_to_none=True)
    loss.backward()
    value_opt.step()
    return loss.item()


# ----------------------------------------------------------------------------------------------
# Losses (paper Sec. 4, Eq. for the KL-regularised objective; official train_online_pg.py).


def kl_regulariser(eps, eps_pre):
    """Official KL surrogate: mean over dims of (eps_theta - eps_pre)^2 (deviation 2)."""
    return ((eps - eps_pre) ** 2).mean(dim=(1, 2, 3))


def kl_step_weight(scheduler, timestep, eta):
    """c_t^2 / (2 sigma_t^2): KL(N(mu_theta, s^2) || N(mu_pre, s^2)) = this * (eps diff)^2,
    with c_t = sqrt(1 - a_prev - sigma^2) - sqrt(a_prev) sqrt(1 - a_t) / sqrt(a_t)."""
    a_t, a_prev = ddim_alphas(scheduler, timestep)
    sigma = ddim_sigma(scheduler, timestep, eta)
    c = (1 - a_prev - sigma**2).sqrt() - a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt()
    return c**2 / (2 * sigma**2)


def policy_loss(unet, scheduler, batch, cond, uncond, value_fn, args):
    """DPOK's per-transition loss (official form, deviation 3):
        -alpha * A * clamp(p_theta(x_{t-1}|x_t) / p_old(x_{t-1}|x_t), 1 - c, 1 + c) + beta * KL_t
    with A = r - V(x_t, z, t). Its gradient is the policy gradient of Sec. 4 with importance
    weights for transitions sampled by an earlier policy, plus the online KL of Sec. 4."""
    text = cond[batch["prompt_index"]]
    eps = guided_eps(unet, batch["latents"], batch["timesteps"], text, uncond, args.guidance)
    _, log_prob = ddim_step_logprob(scheduler, eps, batch["timesteps"],
                                    batch["latents"], args.eta, prev_sample=batch["next_latents"])
    ratio = torch.exp(log_prob - batch["log_prob"])
    advantage = batch["reward"]
    if value_fn is not None:
        with torch.no_grad():
            advantage = advantage - value_fn(batch["latents"], text, batch["step"])
    clipped = ratio.clamp(1 - args.ratio_clip, 1 + args.ratio_clip)
    loss = -args.reward_alpha * advantage * clipped
    stats = dict(ratio=ratio.mean().item(), clipfrac=(ratio != clipped).float().mean().item())
    if args.kl_beta > 0:  # no second UNet pass when the estimator does not need it
        with pretrained_model(unet), torch.no_grad():
            eps_pre = guided_eps(unet, batch["latents"], batch["timesteps"], text, uncond,
                                 args.guidance)
        kl = kl_regulariser(eps, eps_pre)
        loss = loss + args.kl_beta * kl
        stats["kl"] = kl.mean().item()
    return loss.mean(), dict(stats, loss=loss.mean().item())


def accumulate_gradient(loss_fn, batch, batch_size, scaler=None):
    """Backward the mean loss over `batch` in micro-batches of `batch_size` (gradient
    accumulation). Each micro-batch mean is weighted by its share of the batch, so the summed
    gradient equals the full batch's gradient exactly, whatever the slicing. Returns the
    batch-mean of the stats that loss_fn reports."""
    n = len(batch["reward"])
    stats = {}
    for start in range(0, n, batch_size):
        micro = {k: v[start:start + batch_size] for k, v in batch.items()}
        share = len(micro["reward"]) / n
        loss, micro_stats = loss_fn(micro)
        (scaler.scale(loss * share) if scaler else loss * share).backward()
        for k, v in micro_stats.items():
            stats[k] = stats.get(k, 0.0) + v * share
    return stats


# ----------------------------------------------------------------------------------------------
# Training loop (PAPER.md Sec. 3): rollout -> buffer -> value function -> policy steps.


def sample_batch(buffer, size, generator):
    """`size` distinct random transitions of the buffer (all of them if it holds fewer)."""
    idx = torch.randperm(len(buffer["reward"]), generator=generator)[:size]
    return {k: v[idx.to(v.device)] for k, v in buffer.items()}


def save_lora(unet, out):
    """LoRA weights in diffusers' format: StableDiffusionPipeline.load_lora_weights(out) loads them.
    Written to a temporary folder and renamed, so a crash never leaves a half-written file."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))


class TrainingStopped(Exception):
    """The run stopped on purpose (signal: exit 128 + signum) or on a non-finite value (exit 1)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


# Flags that do not change the algorithm: a resumed run may change them.
RESUMABLE = {"iterations", "out", "resume", "overwrite", "save_every", "grid_every", "device"}
OUTPUTS = ("metrics.jsonl", "checkpoint.pt", "pytorch_lora_weights.safetensors", "samples_",
           "reward_curve.png")


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
    if args.resume and not os.path.exists(checkpoint):
        raise UsageError(f"--resume: no checkpoint.pt in {args.out}")
    if previous and not (args.resume or args.overwrite):
        raise UsageError(f"--out {args.out} holds a previous run; add --resume to continue it or "
                         "--overwrite to replace it")
    check_writable(args.out)
    if args.resume:
        try:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated or not ours: say so instead of a traceback
            raise UsageError(f"--resume: cannot read {checkpoint} ({type(e).__name__})")
        for name, value in saved["args"].items():
            if name not in RESUMABLE and getattr(args, name) != value:
                raise UsageError(f"--resume: --{name.replace('_', '-')} was {value!r} in the "
                                 f"checkpoint, now {getattr(args, name)!r}; resume with the same value")
        return saved
    if previous:  # --overwrite: remove what an earlier run wrote, nothing else
        for name in os.listdir(args.out):
            if name.startswith(OUTPUTS):
                os.remove(os.path.join(args.out, name))
    return None


def save_checkpoint(args, iteration, unet, optimizer, value_fn, value_opt, buffer, generator):
    """Everything a resumed run needs to continue bit for bit; written atomically (tmp + rename)."""
    state = dict(
        iteration=iteration, args=dataclasses.asdict(args), buffer=buffer,
        lora={n: p.detach() for n, p in unet.named_parameters() if p.requires_grad},
        optimizer=optimizer.state_dict(), generator=generator.get_state(),
        value_fn=value_fn and value_fn.state_dict(), value_opt=value_opt and value_opt.state_dict())
    path = os.path.join(args.out, "checkpoint.pt")
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        save_lora(unet, args.out)
    except OSError as e:  # disk full, folder removed: the previous checkpoint is still whole
        raise TrainingStopped(f"cannot write the checkpoint in {args.out} ({e}); the previous "
                              "one is intact", 1)


def stop_now(signum, frame):
    raise TrainingStopped(f"{signal.Signals(signum).name}: stopped at once; checkpoints already "
                          "in --out are kept", 128 + signum)


def format_kl(kl):
    return "not computed, beta = 0" if kl is None else f"{kl:.2e}"


def check_finite(name, value, iteration):
    if not math.isfinite(value):
        raise TrainingStopped(f"non-finite {name} ({value}) at iteration {iteration}; stopped, the "
                              "last checkpoint in --out is the last good state", 1)


def train(args):
    prompts = read_prompts(args)
    saved = check_out(args)
    torch.manual_seed(args.seed)
    pipe = load_pipeline(args)
    reward_fn = REWARDS[args.reward](args.device)
    params = add_lora(pipe.unet, args.lora_rank)
    cond, uncond = encode_prompts(pipe, prompts)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    scaler = torch.amp.GradScaler(enabled=args.dtype == "float16")
    value_fn = value_opt = None
    if not (args.no_value or args.supervised):
        latent_dim = pipe.unet.config.in_channels * pipe.unet.config.sample_size**2
        value_fn = ValueFunction(latent_dim, cond.shape[-1], args.steps).to(args.device)
        value_opt = torch.optim.AdamW(value_fn.parameters(), lr=args.value_lr)
    generator = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    buffer, history, first = None, [], 0
    if saved is not None:  # resume: restore every state, drop metrics of unsaved iterations
        pipe.unet.load_state_dict(saved["lora"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        if value_fn is not None:
            value_fn.load_state_dict(saved["value_fn"])
            value_opt.load_state_dict(saved["value_opt"])
        generator.set_state(saved["generator"])
        buffer = {k: v.to(args.device) for k, v in saved["buffer"].items()}
        first = saved["iteration"]
        with open(metrics_path) as f:
            history = [m for m in map(json.loads, f) if m["iteration"] < first]
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in history)
    elif args.supervised:  # the baseline's fixed data set plays the buffer's part
        buffer = collect_supervised_data(pipe, cond, uncond, prompts, reward_fn, args, generator)
    per_update = args.batch_size * args.grad_accum
    print(f"dpok: {'tiny random pipeline' if args.tiny else args.model} on {args.device} "
          f"({args.dtype}), reward {args.reward}, {len(prompts)} prompt(s), {len(params)} LoRA "
          f"tensors ({sum(p.numel() for p in params):,} weights); per iteration "
          f"{args.samples_per_iter} x {args.steps} transitions in, {args.policy_steps} updates of "
          f"{per_update} ({args.grad_accum} x {args.batch_size}) transitions"
          + (f"; resuming at iteration {first}" if saved else ""), file=sys.stderr)

    if args.supervised:
        loss_fn = lambda m: supervised_loss(pipe.unet, pipe.scheduler, m, cond, args, generator)
    else:
        loss_fn = lambda m: policy_loss(pipe.unet, pipe.scheduler, m, cond, uncond, value_fn, args)

    def checkpoint(iteration):
        save_checkpoint(args, iteration, pipe.unet, optimizer, value_fn, value_opt, buffer, generator)

    # First SIGINT/SIGTERM: finish the iteration in flight, save, exit. A second: stop at once.
    stop = []

    def request_stop(signum, frame):
        if stop:
            stop_now(signum, frame)
        stop.append(signum)

    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        bar = tqdm(range(first, args.iterations), desc="dpok", dynamic_ncols=True,
                   initial=first, total=args.iterations)
        for iteration in bar:
            start = time.time()
            # 1. Rollout with the current policy; score x_0; append to the FIFO buffer (RL only:
            #    the supervised baseline samples only to measure the reward the same way).
            prompt_index = torch.randint(len(prompts), (args.samples_per_iter,), generator=generator)
            transitions, images = rollout(pipe, cond, uncond, prompt_index.to(args.device), args,
                                          generator)
            with torch.no_grad():
                rewards = reward_fn(images, [prompts[i] for i in prompt_index]).float()
            check_finite("reward", rewards.sum().item(), iteration)
            per_image = len(transitions["log_prob"]) // len(rewards)
            transitions["reward"] = rewards.to(args.device).repeat_interleave(per_image)
            if not args.supervised:
                buffer = transitions if buffer is None else {
                    k: torch.cat([buffer[k], v])[-args.buffer_size:] for k, v in transitions.items()}
            # 2. Value function: regress V(x_t, z, t) onto the final reward.
            value_loss = None
            if value_fn is not None:
                for _ in range(args.value_steps):
                    batch = sample_batch(buffer, args.value_batch_size, generator)
                    value_loss = value_step(value_fn, value_opt, batch, cond)
                check_finite("value loss", value_loss, iteration)
            # 3. Policy: each update accumulates grad_accum micro-batches of batch_size.
            totals, grad_norm = {}, 0.0
            for _ in range(args.policy_steps):
                optimizer.zero_grad(set_to_none=True)
                batch = sample_batch(buffer, per_update, generator)
                stats = accumulate_gradient(loss_fn, batch, args.batch_size, scaler)
                check_finite("loss", stats["loss"], iteration)
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(params, args.clip_norm).item()
                if not scaler.is_enabled():  # under fp16 the scaler skips steps with inf grads
                    check_finite("gradient norm", norm, iteration)
                grad_norm += norm / args.policy_steps
                scaler.step(optimizer)
                scaler.update()
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v / args.policy_steps
            metrics = dict(iteration=iteration, reward_mean=rewards.mean().item(),
                           reward_std=rewards.std().item() if len(rewards) > 1 else 0.0,
                           **{"kl": None, **totals}, grad_norm=grad_norm, value_loss=value_loss,
                           seconds=time.time() - start)
            history.append(metrics)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if iteration % args.grid_every == 0 or iteration == args.iterations - 1:
                from torchvision.utils import save_image
                save_image(images, os.path.join(args.out, f"samples_{iteration:05d}.png"),
                           nrow=math.ceil(math.sqrt(len(images))))
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=format_kl(metrics["kl"]))
            if stop or (iteration + 1) % args.save_every == 0 or iteration + 1 == args.iterations:
                checkpoint(iteration + 1)
            if stop:
                name = signal.Signals(stop[0]).name
                raise TrainingStopped(
                    f"{name}: saved iteration {iteration + 1} to {args.out}/checkpoint.pt; continue "
                    f"with the same command and --resume", 128 + stop[0])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    plot_curves(history, os.path.join(args.out, "reward_curve.png"))
    first_reward, last = history[0], history[-1]
    print(f"dpok: reward {first_reward['reward_mean']:.4f} -> {last['reward_mean']:.4f} over "
          f"{len(history)} iterations (KL {format_kl(last['kl'])}); LoRA weights and metrics in "
          f"{args.out}")
    return history


# ----------------------------------------------------------------------------------------------
# Supervised baseline (paper Sec. 4.2, after Lee et al. 2023): reward-weighted denoising on images
# sampled once from the pretrained model, with the KL term evaluated offline on them ("KL-O").


@torch.no_grad()
def collect_supervised_data(pipe, cond, uncond, prompts, reward_fn, args, generator):
    """Sample --supervised-samples images per prompt from the pretrained model, score them once.

    The loss weights rewards, so they must be non-negative: they are min-max normalised over the
    whole data set to [0, 1] (worst image 0, best 1), which keeps their order and alpha's scale.
    """
    index = torch.arange(len(prompts)).repeat_interleave(args.supervised_samples)
    latents, rewards = [], []
    with pretrained_model(pipe.unet):
        for chunk in tqdm(index.split(args.samples_per_iter), desc="sampling data", leave=False):
            transitions, images = rollout(pipe, cond, uncond, chunk.to(args.device), args, generator)
            latents.append(transitions["next_latents"].unflatten(0, (len(chunk), -1))[:, -1])  # x_0
            rewards.append(reward_fn(images, [prompts[i] for i in chunk]).float())
    rewards = torch.cat(rewards)
    check_finite("reward", rewards.sum().item(), 0)
    weight = (rewards - rewards.min()) / (rewards.max() - rewards.min()).clamp(min=1e-12)
    print(f"dpok: supervised data: {len(rewards)} images, reward {rewards.mean():.4f} "
          f"+- {rewards.std():.4f}", file=sys.stderr)
    return dict(latents=torch.cat(latents), prompt_index=index.to(args.device),
                reward=weight.to(args.device))


def supervised_loss(unet, scheduler, batch, cond, args, generator):
    """alpha * w(r) * ||n - eps_theta(x_t, t, z)||^2 + beta * ||eps_theta - eps_pre||^2 on
    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) n with t uniform, n ~ N(0, I) (PAPER.md Sec. 4).
    Conditional noise predictions (no guidance), as in ordinary diffusion fine-tuning."""
    x0, text = batch["latents"], cond[batch["prompt_index"]]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    x_t = scheduler.add_noise(x0, noise, t.to(x0.device))
    eps = unet(x_t.to(text.dtype), t.to(x0.device), encoder_hidden_states=text).sample.float()
    denoise = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    loss = args.reward_alpha * batch["reward"] * denoise
    stats = dict(denoise=denoise.mean().item())
    if args.kl_beta > 0:
        with pretrained_model(unet), torch.no_grad():
            eps_pre = unet(x_t.to(text.dtype), t.to(x0.device), encoder_hidden_states=text).sample
        kl = kl_regulariser(eps, eps_pre.float())
        loss = loss + args.kl_beta * kl
        stats["kl"] = kl.mean().item()
    return loss.mean(), dict(stats, loss=loss.mean().item())


# ----------------------------------------------------------------------------------------------
# Evaluation: pretrained vs fine-tuned on the same seeds, and the KL bound of the fine-tuned model.


@torch.no_grad()
def kl_bound(pipe, transitions, cond, uncond, args):
    """Exact KL_t of each stored transition: two Gaussians with the same sigma_t, summed over
    latent dims. Summed over t it bounds KL(p_theta(x_0|z) || p_pre(x_0|z)) (paper's lemma)."""
    step_kl = []
    for idx in torch.arange(len(transitions["log_prob"])).split(args.samples_per_iter):
        b = {k: v[idx.to(v.device)] for k, v in transitions.items()}
        with pretrained_model(pipe.unet):  # eps_theta was kept by the rollout
            eps_pre = guided_eps(pipe.unet, b["latents"], b["timesteps"], cond[b["prompt_index"]],
                                 uncond, args.guidance)
        weight = kl_step_weight(pipe.scheduler, b["timesteps"], args.eta).to(eps_pre.device)
        step_kl.append(weight * ((b["eps"] - eps_pre) ** 2).sum(dim=(1, 2, 3)))
    return torch.cat(step_kl)  # (transitions,), image-major like the rollout


def evaluate(args):
    prompts = read_prompts(args)
    check_writable(args.out)  # eval.json and eval.png may go beside the run they evaluate
    torch.manual_seed(args.seed)
    pipe = load_pipeline(args)
    reward_fn = REWARDS[args.reward](args.device)
    try:
        pipe.load_lora_weights(args.lora)
    except Exception as e:
        raise UsageError(f"--lora {args.lora}: cannot load LoRA weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]})")
    cond, uncond = encode_prompts(pipe, prompts)
    os.makedirs(args.out, exist_ok=True)
    rows, grid = [], []
    for p, prompt in enumerate(tqdm(prompts, desc="eval")):
        # Two generators with one seed: both models start from the same noise, chunk by chunk.
        seeds = [torch.Generator().manual_seed(args.seed) for _ in range(2)]
        before, after, kl = [], [], []
        for chunk in torch.full((args.eval_samples,), p).split(args.samples_per_iter):
            with pretrained_model(pipe.unet):
                before.append(rollout(pipe, cond, uncond, chunk.to(args.device), args, seeds[0])[1])
            transitions, images = rollout(pipe, cond, uncond, chunk.to(args.device), args, seeds[1],
                                          keep_eps=True)
            after.append(images)
            kl.append(kl_bound(pipe, transitions, cond, uncond, args).unflatten(0, (len(chunk), -1)))
        before, after, kl = torch.cat(before), torch.cat(after), torch.cat(kl).sum(1)  # (n,)
        r0 = reward_fn(before, [prompt] * args.eval_samples)
        r1 = reward_fn(after, [prompt] * args.eval_samples)
        rows.append(dict(prompt=prompt, reward_pretrained=r0.mean().item(),
                         reward_pretrained_std=r0.std().item(), reward_finetuned=r1.mean().item(),
                         reward_finetuned_std=r1.std().item(), kl_bound=kl.mean().item()))
        grid += [before, after]
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(dict(lora=args.lora, eval_samples=args.eval_samples, seed=args.seed,
                       reward=args.reward, results=rows), f, indent=1)
    from torchvision.utils import save_image
    save_image(torch.cat(grid), os.path.join(args.out, "eval.png"), nrow=args.eval_samples)
    width = max(len("prompt"), *(len(r["prompt"]) for r in rows))
    print(f"{'prompt':<{width}}  {'reward pretrained':>18}  {'reward fine-tuned':>18}  {'KL bound':>9}")
    for r in rows:
        print(f"{r['prompt']:<{width}}  {r['reward_pretrained']:>9.4f} +- {r['reward_pretrained_std']:<6.4f}"
              f"  {r['reward_finetuned']:>9.4f} +- {r['reward_finetuned_std']:<6.4f}  {r['kl_bound']:>9.4f}")
    print(f"dpok: eval of {args.lora} written to {args.out}/eval.json and eval.png "
          "(top row of each pair: pretrained, bottom: fine-tuned, same seeds)")
    return rows


def plot_curves(history, path, size=(480, 300)):
    """reward_mean (top) and KL (bottom) per iteration as a PNG, drawn with PIL."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    w, h = size[0] - 20, size[1] // 2 - 25
    for row, (key, colour) in enumerate((("reward_mean", "green"), ("kl", "red"))):
        values = [m[key] for m in history if m[key] is not None]
        if not values:
            continue
        top, lo, hi = 20 + row * (h + 25), min(values), max(values)
        span = (hi - lo) or 1.0
        points = [(10 + w * i / max(len(values) - 1, 1), top + h * (1 - (v - lo) / span))
                  for i, v in enumerate(values)]
        draw.rectangle([10, top, 10 + w, top + h], outline="gray")
        draw.line(points if len(points) > 1 else points * 2, fill=colour, width=2)
        draw.text((14, top - 14), f"{key}: {lo:.4g} .. {hi:.4g} over {len(values)} iterations",
                  fill="black")
    image.save(path)


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv=None):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()  # our own one-line messages say what went wrong
    transformers_logging.set_verbosity_error()
    # Outside the training loop (loading, data collection, eval) a signal stops at once.
    handlers = {sig: signal.signal(sig, stop_now) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        args = parse_args(argv)
        evaluate(args) if args.eval else train(args)
    except UsageError as e:
        print(f"dpok: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"\ndpok: {e}", file=sys.stderr)
        return e.code
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
