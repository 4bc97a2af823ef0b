"""The offline world of dpok.py: pipelines and rewards that need no download.

Not the algorithm (that is all in dpok.py, which imports this module only when it needs it):
- `tiny_pipeline`: a random SD-shaped pipeline small enough to train on 2 CPU cores (`--tiny`),
  and `TINY_DEFAULTS`, the hyperparameters `--tiny` trains it with;
- `sd15_pipeline`: a random pipeline with Stable Diffusion v1.5's exact architecture, tokenizer
  and scheduler config, to run the real `--model PATH` code path without the weights (tests on
  CPU at a small latent size; speed and memory at 64x64 latents on a GPU);
- `color_reward`, `compressibility_reward`: rewards that need no weights.
"""

import gzip
import io
import json
import os
import tempfile

import torch

# Defaults of dpok.py --tiny, calibrated on 2 CPU cores (README "Deviations" 8): a random model
# learns only at far larger learning rates, where the official 1e-4 ratio clip would clamp most
# transitions; alpha is scaled to the colour reward's spread.
TINY_DEFAULTS = dict(
    reward="color", steps=10, guidance=3.0, samples_per_iter=8, buffer_size=160,
    policy_steps=2, grad_accum=2, batch_size=16, lr=3e-3, ratio_clip=0.2, reward_alpha=500.0,
    value_steps=10, value_batch_size=128, value_lr=1e-2, iterations=100, save_every=25,
    supervised_samples=800, eval_samples=32,
)

# ----------------------------------------------------------------------------------------------
# Pipelines


def clip_tokenizer(merges, max_length):
    """A CLIPTokenizer over CLIP's byte-level BPE with the given merges (pairs of symbols).
    The vocabulary is built the way CLIP builds it: 256 bytes, the same as word ends, one token
    per merge, then the two special tokens."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump({token: i for i, token in enumerate(vocab)}, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                             model_max_length=max_length)


def clip_text_model(tokenizer, **sizes):
    """A random CLIPTextModel (quick-GELU, CLIP's default) sized to the tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **sizes))


def sd_pipeline(text_encoder, tokenizer, unet, vae, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def tiny_pipeline(seed=0):
    """A random SD-shaped pipeline built in code: 8x8x4 latents, 64 px images, no download.

    GroupNorm with one group (SD: 32) in the UNet and the VAE: with one group per channel, a
    random model normalises away every per-channel shift, so colour can barely be learned
    (measured: the mean reward did not move in 60 iterations; with one group it triples).
    The tokenizer has no merges: one token per character, so every prompt tokenises.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer([], max_length=77)  # SD's context length
    text_encoder = clip_text_model(tokenizer, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4)
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
    return sd_pipeline(text_encoder, tokenizer, unet, vae, scheduler)


def sd15_pipeline(sample_size=64, seed=0):
    """Stable Diffusion v1.5's exact architecture with random weights (no download).

    UNet 320/640/1280/1280 with two layers per block, cross-attention 768 and 8 heads; the VAE
    128/256/512/512; CLIP ViT-L/14's text tower (12 layers of width 768, quick-GELU) with the real
    CLIP BPE vocabulary, which ships inside the `clip-anytorch` package; and the PNDM scheduler
    config SD ships (clip_sample false included: DDIM's default would clip). `sample_size` is
    the latent size: 64 is SD's 512 px, a smaller one makes a CPU run cheap.
    """
    import clip
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    bpe = os.path.join(os.path.dirname(clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
    tokenizer = clip_tokenizer(merges, max_length=77)
    # diffusers' UNet defaults are SD v1's (320/640/1280/1280, 2 layers, 8 heads) but for the
    # cross-attention width.
    unet = UNet2DConditionModel(sample_size=sample_size, cross_attention_dim=768)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        sample_size=sample_size * 8, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = clip_text_model(tokenizer, hidden_size=768, intermediate_size=3072,
                                   num_hidden_layers=12, num_attention_heads=12,
                                   projection_dim=768, hidden_act="quick_gelu")
    scheduler = PNDMScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, num_train_timesteps=1000))
    return sd_pipeline(text_encoder, tokenizer, unet, vae, scheduler)


# ----------------------------------------------------------------------------------------------
# Rewards that need no weights. Each takes images (B, 3, H, W) in [0, 1] and B prompts.

COLOURS = {  # colour word -> RGB channels that should dominate
    "red": [0], "green": [1], "blue": [2], "yellow": [0, 1], "cyan": [1, 2], "magenta": [0, 2],
    "purple": [0, 2], "pink": [0, 2],
}


def prompt_colour(prompt):
    """The first colour word of the prompt; ValueError if it has none."""
    words = [w.strip(".,;:!?\"'") for w in prompt.lower().split()]
    found = [w for w in words if w in COLOURS]
    if not found:
        raise ValueError(f"--reward color needs a colour word ({', '.join(COLOURS)}) in "
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
