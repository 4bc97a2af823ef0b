"""The real models' architectures with random weights, built in code (no download): what the
tests and benchmark.py run the real `--model PATH` and reward code paths on, without a GPU.

- `sd15_pipeline`: Stable Diffusion v1.5's exact architecture, tokenizer and scheduler config
  (tests on a CPU at a small latent size; speed and memory at 64x64 latents on a GPU).
- `sd2_pipeline`: Stable Diffusion 2.1's (768 px, v prediction, OpenCLIP ViT-H text encoder).
- `sdxl_pipeline`: SDXL base 1.0's structure and conditioning (two text encoders, pooled text and
  size ids added to the time embedding) at reduced width and depth, or full size.
- `imagereward_model`, `aesthetic_model`: image-reward's ImageReward and aesthetic predictor with
  their real architectures (tests; benchmark.py's reward phase).
- `clip_tokenizer`, `clip_text_model`, `sd_pipeline`: the pieces, also used by the shapes world.
"""

import gzip
import json
import os
import tempfile

import torch

def clip_tokenizer(merges, max_length, **special):
    """A CLIPTokenizer over CLIP's byte-level BPE with the given merges (pairs of symbols).
    The vocabulary is built the way CLIP builds it: 256 bytes, the same as word ends, one token
    per merge, then the two special tokens; `special`: other special tokens (SD 2's pad "!")."""
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
                             model_max_length=max_length, **special)


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


def sd15_pipeline(sample_size=64, seed=0):
    """Stable Diffusion v1.5's exact architecture with random weights (no download).

    UNet 320/640/1280/1280 with two layers per block, cross-attention 768 and 8 heads; the VAE
    128/256/512/512; CLIP ViT-L/14's text tower (12 layers of width 768, quick-GELU) with the real
    CLIP BPE vocabulary, which ships inside the `clip-anytorch` package; and the PNDM scheduler
    config SD ships (clip_sample false included: DDIM's default would clip). `sample_size` is
    the latent size: 64 is SD's 512 px, a smaller one makes a CPU run cheap.
    """
    from diffusers import PNDMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(clip_merges(), max_length=77)
    # diffusers' UNet defaults are SD v1's (320/640/1280/1280, 2 layers, 8 heads) but for the
    # cross-attention width.
    unet = UNet2DConditionModel(sample_size=sample_size, cross_attention_dim=768)
    vae = sd_vae(sample_size)
    text_encoder = clip_text_model(tokenizer, hidden_size=768, intermediate_size=3072,
                                   num_hidden_layers=12, num_attention_heads=12,
                                   projection_dim=768, hidden_act="quick_gelu")
    scheduler = PNDMScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, num_train_timesteps=1000))
    return sd_pipeline(text_encoder, tokenizer, unet, vae, scheduler)


def sd2_pipeline(sample_size=96, seed=0):
    """Stable Diffusion 2.1's exact architecture with random weights (no download).

    The UNet of SD v1 with 5/10/20/20 heads of width 64, linear projections into and out of
    attention, attention computed in float32 (upcast_attention) and cross-attention 1024 wide;
    OpenCLIP ViT-H/14's text tower as transformers holds it (23 layers of width 1024, GELU, the
    legacy end-of-text id 2: pooled at the largest token id) with CLIP's vocabulary and "!" as
    padding; SD v1's VAE; the DDIM scheduler config it ships, v prediction. `sample_size` 96 is
    its 768 px."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(clip_merges(), max_length=77, pad_token="!")
    unet = UNet2DConditionModel(sample_size=sample_size, cross_attention_dim=1024,
                                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                                upcast_attention=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=23, num_attention_heads=16, projection_dim=512, hidden_act="gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1))
    scheduler = DDIMScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, num_train_timesteps=1000,
        prediction_type="v_prediction"))
    return sd_pipeline(text_encoder, tokenizer, unet, sd_vae(sample_size), scheduler)


def sdxl_pipeline(sample_size=16, seed=0, full=False):
    """SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0) with random weights (no download).

    Always its conditioning, at full width: token states 2048 wide (CLIP ViT-L/14's 768, the
    penultimate layer, beside OpenCLIP ViT-bigG/14's 1280), the pooled, projected bigG embedding
    (1280) and six size ids (256 each) added to the time embedding ("text_time", 2816 in), and
    both tokenizers (the second pads with "!"); its UNet's structure (three levels: no attention,
    then 2 and 10 transformer layers per block, linear projections, heads of width 64), SD's VAE
    (SDXL's scaling factor) and the Euler scheduler config it ships. full=True: every width and
    depth as shipped (UNet 2.6 G weights, text towers 12 and 32 layers); otherwise the UNet is
    64/128/256 wide (heads 1/2/4) and each text tower 2 layers deep, for a CPU test."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    widths, heads = ((320, 640, 1280), (5, 10, 20)) if full else ((64, 128, 256), (1, 2, 4))
    unet = UNet2DConditionModel(
        sample_size=sample_size, block_out_channels=widths, attention_head_dim=heads,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280)
    merges = clip_merges()
    tokenizers = clip_tokenizer(merges, max_length=77), clip_tokenizer(merges, max_length=77, pad_token="!")
    text_encoder = clip_text_model(tokenizers[0], hidden_size=768, intermediate_size=3072,
                                   num_hidden_layers=12 if full else 2, num_attention_heads=12,
                                   projection_dim=768, hidden_act="quick_gelu")
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_size=1280, intermediate_size=5120,
        num_hidden_layers=32 if full else 2, num_attention_heads=20, projection_dim=1280,
        hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1))  # as SD 2.1's tower
    scheduler = EulerDiscreteScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, num_train_timesteps=1000,
        timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear"))
    return StableDiffusionXLPipeline(
        vae=sd_vae(sample_size, scaling_factor=0.13025), text_encoder=text_encoder,
        text_encoder_2=text_encoder_2, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
        scheduler=scheduler, add_watermarker=False)


def clip_merges():
    """CLIP's BPE merges (OpenCLIP's are the same), shipped inside the `clip-anytorch` package."""
    import clip

    bpe = os.path.join(os.path.dirname(clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        return [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]


def sd_vae(sample_size, scaling_factor=0.18215):
    """SD v1's, 2's and SDXL's VAE: 128/256/512/512, two layers per block, 4 latent channels, 8x."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        sample_size=sample_size * 8, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=scaling_factor)


def imagereward_model(folder, seed=0, device="cpu"):
    """image-reward's ImageReward (BLIP ViT-L + a 12-layer BERT with cross-attention, 447 M
    weights) with random weights, built offline in `folder`: BLIP's tokenizer loads
    "bert-base-uncased" from the working directory first, so a vocabulary of the special tokens
    and single letters (every word becomes its letters) is written there, with BERT-base's
    `med_config.json`. The package initialises its scoring MLP so small that every score is the
    same; it is redrawn here (xavier) so that scores depend on the image and the prompt."""
    import contextlib
    import string
    import warnings

    with warnings.catch_warnings():  # its `clip` dependency warns about pkg_resources
        warnings.simplefilter("ignore")
        import ImageReward

    os.makedirs(os.path.join(folder, "bert-base-uncased"), exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *("##" + c for c in string.ascii_lowercase)]
    with open(os.path.join(folder, "bert-base-uncased", "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    config = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
                  hidden_dropout_prob=0.1, hidden_size=768, initializer_range=0.02,
                  intermediate_size=3072, layer_norm_eps=1e-12, max_position_embeddings=512,
                  model_type="bert", num_attention_heads=12, num_hidden_layers=12, pad_token_id=0,
                  type_vocab_size=2, vocab_size=30524, encoder_width=1024, add_cross_attention=True)
    with open(os.path.join(folder, "med_config.json"), "w") as f:
        json.dump(config, f)
    torch.manual_seed(seed)
    with contextlib.chdir(folder):
        model = ImageReward.ImageReward(med_config="med_config.json", device=device)
    for layer in model.mlp.layers:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.xavier_normal_(layer.weight)
    return model.to(device).eval()


def aesthetic_model(folder, seed=0, device="cpu", vision_layers=24, vision_width=1024):
    """image-reward's AestheticScore (a CLIP image tower + an MLP) with random weights, offline:
    CLIP ViT-L/14's image tower by default (24 layers of width 1024, patch 14, 768-wide output);
    a test passes a narrower, shallower tower of the same output width."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import clip
        from ImageReward.models.AestheticScore import AestheticScore

    torch.manual_seed(seed)
    tower = clip.model.CLIP(
        embed_dim=768, image_resolution=224, vision_layers=vision_layers, vision_width=vision_width,
        vision_patch_size=14, context_length=77, vocab_size=49408, transformer_width=768,
        transformer_heads=12, transformer_layers=1)
    real_load = clip.load
    clip.load = lambda *args, **kwargs: (tower, clip.clip._transform(224))  # no download
    try:
        model = AestheticScore(download_root=folder, device=device)
    finally:
        clip.load = real_load
    for layer in model.mlp.layers:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.xavier_normal_(layer.weight)
    return model.to(device).eval()

