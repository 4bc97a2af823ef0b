"""The worlds of dpok.py that need no download; the algorithm is all in dpok.py.

- The shapes world (`--tiny`): captions like "two red circles" and 32 px images of coloured
  shapes made in code; `pretrain` trains a tiny text-to-image model of Stable Diffusion's own
  component types on them from scratch (`python offline.py` remakes the shipped `tiny-shapes/`
  folder, about 8 minutes on 2 CPU cores); `shapes_reward` judges prompt alignment with an
  analyser that needs no weights, and `clean_fraction` is its fidelity measure. `TINY_DEFAULTS`
  are the hyperparameters `--tiny` trains with. `LearnedReward` is its learned reward
  (`--reward shapes-learned`), fitted to the analyser's scores of the pretrained model's samples.
- The README's Results, remade by one command: `python offline.py --results FOLDER`
  (`reproduce`: the runs, several at a time, then the tables and figures).
- `sd15_pipeline`: a random pipeline with Stable Diffusion v1.5's exact architecture, tokenizer
  and scheduler config, to run the real `--model PATH` code path without the weights (tests on
  CPU at a small latent size; speed and memory at 64x64 latents on a GPU).
- `imagereward_model`, `aesthetic_model`: image-reward's ImageReward and aesthetic predictor with
  their real architectures and random weights (tests; benchmark.py's reward phase).
- `compressibility_reward`: DDPO's weight-free reward, for any model.
"""

import gzip
import io
import json
import os
import tempfile

import torch
import torch.nn.functional as F

# Defaults of dpok.py --tiny, calibrated on 2 CPU cores (README "Deviations" 8): the shipped
# model of the shapes world, its reward, and a small model's far larger learning rate.
TINY_DEFAULTS = dict(
    model=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny-shapes"),
    reward="shapes", steps=20, guidance=4.0, samples_per_iter=16, buffer_size=640,
    policy_steps=2, grad_accum=2, batch_size=32, lr=3e-4, ratio_clip=0.2, reward_alpha=10.0,
    value_steps=10, value_batch_size=128, value_lr=1e-3, iterations=150, save_every=25,
    supervised_samples=1600, eval_samples=64,
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


# ----------------------------------------------------------------------------------------------
# A reward any model can use. Rewards take images (B, 3, H, W) in [0, 1] and B prompts.

def compressibility_reward(images, prompts):
    """DDPO's JPEG compressibility: minus the file size in kB at quality 95."""
    from torchvision.transforms.functional import to_pil_image

    sizes = []
    for image in images:
        buffer = io.BytesIO()
        to_pil_image(image.float().cpu()).save(buffer, format="JPEG", quality=95)
        sizes.append(-buffer.tell() / 1000)
    return torch.tensor(sizes)


# ----------------------------------------------------------------------------------------------
# The shapes world: a tiny text-to-image model pretrained here, and the reward that judges it.
# Captions "two red circles"; 32 px images of 1-3 identical shapes of one colour on black.

NUMBERS = {"one": 1, "two": 2, "three": 3}
PALETTE = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
           "yellow": (1.0, 1.0, 0.0)}
SHAPES = ("circle", "square", "triangle")
CAPTIONS = [f"{number} {colour} {shape}{'s' if n > 1 else ''}" for number, n in NUMBERS.items()
            for colour in PALETTE for shape in SHAPES]
# Never seen by the text-to-image model in pretraining (the VAE sees every image): the analogue
# of the paper's unusual prompts such as "A green colored rabbit".
HELD_OUT = ["one green triangle", "two green triangles", "three green triangles",
            "three blue circles", "two yellow squares"]
# The multi-prompt experiment's split: DPOK trains on red, blue and yellow circles and squares;
# "unseen" has a colour (green) and a shape (triangles) it never trains on, so a gain there is
# generalisation, not memorisation; "held-out" the captions pretraining never saw either.
# shapes-prompts/ holds each group as a dpok.py prompts file.
SPLIT = {"trained": [c for c in CAPTIONS if c not in HELD_OUT and "green" not in c and "triangle" not in c],
         "unseen": [c for c in CAPTIONS if c not in HELD_OUT and ("green" in c or "triangle" in c)],
         "held-out": HELD_OUT}
PROMPT_FILES = {group: os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes-prompts", f"{group}.txt")
                for group in SPLIT}
SIZE, MIN_SIDE, MAX_SIDE, GAP = 32, 8, 12, 2  # image, shape sides in pixels, gap between shapes


def parse_caption(prompt):
    """(count, colour, shape) of a caption like "Two red circles."; ValueError otherwise."""
    words = prompt.lower().strip(" .!").split()
    if (len(words) != 3 or words[0] not in NUMBERS or words[1] not in PALETTE
            or words[2].removesuffix("s") not in SHAPES):
        raise ValueError(f"--reward shapes needs captions like 'two red circles' (one|two|three, "
                         f"{'|'.join(PALETTE)}, {'|'.join(SHAPES)}); got {prompt!r}")
    return NUMBERS[words[0]], words[1], words[2].removesuffix("s")


def shape_mask(shape, side):
    """A side x side boolean mask: a disc, a full square, or an upward isosceles triangle."""
    y, x = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    if shape == "circle":
        return (x - side / 2) ** 2 + (y - side / 2) ** 2 <= (side / 2) ** 2
    if shape == "square":
        return torch.ones(side, side, dtype=torch.bool)
    return (x - side / 2).abs() <= (y + 0.5) / 2  # apex at the top middle, base the full bottom row


def render(caption, generator):
    """A clean image (3, 32, 32) in [0, 1] of the caption: shapes of random sides placed at
    random, GAP pixels apart (rejection sampling)."""
    count, colour, shape = parse_caption(caption)
    image = torch.zeros(3, SIZE, SIZE)
    taken = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    placed = 0
    while placed < count:
        side = int(torch.randint(MIN_SIDE, MAX_SIDE + 1, (1,), generator=generator))
        top, left = torch.randint(0, SIZE - side + 1, (2,), generator=generator).tolist()
        box = (slice(max(top - GAP, 0), top + side + GAP), slice(max(left - GAP, 0), left + side + GAP))
        if taken[box].any():
            continue
        taken[top:top + side, left:left + side] = True
        mask = shape_mask(shape, side)
        for channel, value in enumerate(PALETTE[colour]):
            image[channel, top:top + side, left:left + side][mask] = value
        placed += 1
    return image


def nearest_palette_colour(images):
    """Per pixel of (B, 3, H, W) in [0, 1]: the distance (B, H, W) to the nearest of the
    background and the palette colours, and which one it is (0 background, i + 1 the i-th)."""
    references = torch.tensor([(0.0, 0.0, 0.0), *PALETTE.values()])
    distance, index = torch.cdist(images.float().cpu().permute(0, 2, 3, 1).flatten(1, 2),
                                  references[None]).min(-1)
    shape = (images.shape[0], *images.shape[2:])
    return distance.view(shape), index.view(shape)


def objects(mask, min_area):
    """Per image of (B, H, W) booleans, its 8-connected components of at least min_area pixels,
    each cropped to its bounding box (component labels spread by max-pooling)."""
    h, w = mask.shape[1:]
    labels = torch.arange(1.0, h * w + 1).view(1, h, w) * mask
    while True:
        spread = F.max_pool2d(labels[:, None], 3, 1, 1)[:, 0] * mask
        if torch.equal(spread, labels):
            break
        labels = spread
    found = []
    for image in labels:
        found.append([])
        for i in image.unique()[1:] if image.any() else []:
            rows, cols = (image == i).nonzero(as_tuple=True)
            if len(rows) >= min_area:
                found[-1].append(image[rows.min():rows.max() + 1, cols.min():cols.max() + 1] == i)
    return found


def ramp(x, low, high):  # 0 below low, 1 above high, linear between
    return min(max((x - low) / (high - low), 0.0), 1.0)


def shape_score(crop, shape):
    """How much an object (its mask cropped to its box) looks like `shape`, in [0, 1], soft at
    the boundaries. A triangle fills little of its box (clean renders 0.58-0.63; the pretrained
    model's triangles 0.45-0.60, its circles 0.70-0.88). A square has pixels outside the ellipse
    inscribed in its box (clean: 19-22 % of them; the model's squares 9-19 %, circles 0-11 %,
    5th to 95th percentiles). Times squareness: every shape has a square box, merged ones not."""
    fill = crop.float().mean().item()
    h, w = crop.shape
    y, x = torch.meshgrid((torch.arange(h) + 0.5) / h - 0.5, (torch.arange(w) + 0.5) / w - 0.5,
                          indexing="ij")
    outside = (crop & (x**2 + y**2 > 0.25)).sum().item() / crop.sum().item()
    triangle = 1 - ramp(fill, 0.64, 0.70)
    square = (1 - triangle) * ramp(outside, 0.06, 0.10)
    membership = dict(triangle=triangle, square=square, circle=1 - triangle - square)[shape]
    return membership * min(h, w) / max(h, w)


def clean_fraction(images, prompts=None):
    """Fidelity in the shapes world (the analogue of the paper's aesthetic score): the fraction
    of pixels within 0.25 (64 of 255 levels) of the background or a palette colour; it does not
    read the prompts (a held-out measure of dpok.py takes both)."""
    return (nearest_palette_colour(images)[0] < 0.25).float().mean((1, 2))


def analyse(images, prompts):
    """The analyser's scores of each image against its caption, each in [0, 1]: colour (the share
    of non-background pixels in the caption's colour), count (1 - |error| / 2 averaged over the
    objects found as is and after a 1-pixel erosion, which separates shapes joined by a thin
    neck: partial credit for nearly separated shapes), shape (mean shape_score of the objects),
    objects (how many were found, not in [0, 1]), exact (all three right), clean (fidelity: pixels within 0.25 of background or a palette
    colour)."""
    distance, labels = nearest_palette_colour(images)
    labels[distance > 0.5] = -1  # further than 128 of 255 levels from every colour: no colour
    names = ["background", *PALETTE]
    scores = []
    for i, prompt in enumerate(prompts):
        count, colour, shape = parse_caption(prompt)
        mask = labels[i:i + 1] == names.index(colour)
        found = objects(mask, 8)[0]
        eroded = objects(-F.max_pool2d(-mask[:, None].float(), 3, 1, 1)[:, 0] > 0, 3)[0]
        error = (abs(len(found) - count) + abs(len(eroded) - count)) / 2
        foreground = (labels[i] != 0).sum().item()
        shapes = [shape_score(crop, shape) for crop in found]
        scores.append(dict(
            colour=mask.sum().item() / max(foreground, 1), count=1 - min(error, 2) / 2,
            shape=sum(shapes) / len(shapes) if shapes else 0.0, objects=len(found)))
        scores[-1]["exact"] = float(scores[-1]["colour"] > 0.9 and len(found) == count
                                    and all(s > 0.5 for s in shapes))
    for s, clean in zip(scores, (distance < 0.25).float().mean((1, 2)).tolist()):
        s["clean"] = clean  # clean_fraction, from the same distances
    return scores


# Alignment's mean and standard deviation over the shipped model's own samples (DDIM 20 steps,
# guidance 4, 32 seeds of each of the 36 captions): fixed constants, so that the reward is
# standardised the way ImageReward's is, not per batch.
ALIGNMENT_MEAN, ALIGNMENT_STD = 0.815, 0.197


def shapes_reward(images, prompts):
    """Prompt alignment judged by the analyser, dense (graded count and shape errors, partial
    credit for nearly separated shapes): the mean of its colour, count and shape scores,
    standardised by fixed constants."""
    scores = analyse(images, prompts)
    alignment = torch.tensor([(s["colour"] + s["count"] + s["shape"]) / 3 for s in scores])
    return (alignment - ALIGNMENT_MEAN) / ALIGNMENT_STD


class LearnedReward(torch.nn.Module):
    """The shapes world's ImageReward: a small CNN that scores an image (3, 32, 32) against its
    caption, trained on the analyser's labels of the pretrained model's own samples (as
    ImageReward was trained on people's ratings of model generations). The caption's three words
    (number, colour, shape) are embedded and modulate the image features (FiLM)."""

    def __init__(self, width=32):
        super().__init__()
        words = [*NUMBERS.values(), *PALETTE, *SHAPES]  # what parse_caption returns
        self.index = {word: i for i, word in enumerate(words)}
        self.words = torch.nn.Embedding(len(words), 2 * width)
        self.conv = torch.nn.ModuleList([torch.nn.Conv2d(3, width, 3, padding=1),
                                         torch.nn.Conv2d(width, width, 3, stride=2, padding=1),
                                         torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)])
        self.head = torch.nn.Sequential(torch.nn.Linear(2 * width * 16, 64), torch.nn.ReLU(),
                                        torch.nn.Linear(64, 1))

    def forward(self, images, prompts):
        ids = torch.tensor([[self.index[word] for word in parse_caption(p)] for p in prompts])
        film = self.words(ids.to(images.device)).sum(1)  # (B, 2 * width): scale and shift
        h = images.float() * 2 - 1
        for i, conv in enumerate(self.conv):
            h = F.relu(conv(h))
            if i == 1:
                scale, shift = film.chunk(2, dim=1)
                h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.head(F.adaptive_avg_pool2d(h, 4).flatten(1)).squeeze(1)


# The held-out measures of the offline rewards (dpok.MEASURES), never trained on: the clean
# fraction (fidelity) and, beside the learned reward, the analyser as the judge.
MEASURES = {"shapes": dict(fidelity=clean_fraction),
            "shapes-learned": dict(judge=shapes_reward, fidelity=clean_fraction)}


def shapes_tokenizer():
    """A CLIPTokenizer in which every caption word is one token: start from no merges, and while a
    word splits, merge its first two pieces (BPE applies merges in order, so this converges)."""
    words, merges = sorted({w for c in CAPTIONS for w in c.split()}), []
    while True:
        tokenizer = clip_tokenizer(merges, max_length=8)  # "three green triangles." is 6 tokens
        split = [pieces for pieces in map(tokenizer.tokenize, words) if len(pieces) > 1]
        if not split:
            return tokenizer
        merges += list(dict.fromkeys((pieces[0], pieces[1]) for pieces in split))


def shapes_pipeline(seed=0):
    """Stable Diffusion's component types at a tiny size, random: 32 px images, 8x8x4 latents
    (a VAE that downsamples 4x, not 8x), a 1.5 M-weight UNet, a 2-layer text encoder of width 64,
    and SD v1.5's DDIM schedule."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = shapes_tokenizer()
    text_encoder = clip_text_model(tokenizer, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, latent_channels=4,
        sample_size=SIZE, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return sd_pipeline(text_encoder, tokenizer, unet, vae, scheduler)


def pretrain(out, vae_steps=600, unet_steps=1200, seed=0, device="cpu", data=16384):
    """Pretrain the shapes world from scratch and save it as a diffusers pipeline folder in half
    precision. Deterministic for a seed and step counts on one machine; about 8 minutes on 2 CPU
    cores. The VAE first (MSE + 1e-6 KL, every caption), then the UNet and the text encoder
    together on the VAE's latents of the captions not held out (epsilon prediction, 10% empty
    captions for classifier-free guidance), kept as an exponential moving average."""
    from tqdm import tqdm

    pipe = shapes_pipeline(seed).to(device)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    generator = torch.Generator().manual_seed(seed)

    def batch(captions, n):  # n random captions of the list and a fresh render of each
        chosen = [captions[i] for i in torch.randint(len(captions), (n,), generator=generator)]
        return torch.stack([render(c, generator) for c in chosen]).to(device), chosen

    def optimize(params, steps):  # AdamW 1e-3, 100 warm-up steps, linear decay to 1e-4
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / 100, 1 - 0.9 * step / steps))

        def step(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
        return step

    log = dict(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, held_out=HELD_OUT)
    step = optimize(list(vae.parameters()), vae_steps)
    for _ in (bar := tqdm(range(vae_steps), desc="pretrain VAE")):
        images = batch(CAPTIONS, 64)[0] * 2 - 1
        posterior = vae.encode(images).latent_dist
        mse = F.mse_loss(vae.decode(posterior.sample(generator)).sample, images)
        step(mse + 1e-6 * posterior.kl().mean())
        bar.set_postfix(mse=f"{mse.item():.4f}")
        log.setdefault("vae_mse", []).append(mse.item())

    # A fixed data set of latents; scaled to unit variance as SD scales its own (0.18215).
    seen = [c for c in CAPTIONS if c not in HELD_OUT]
    with torch.no_grad():
        images, captions = batch(seen, data)
        latents = torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in images.split(256)])
    vae.register_to_config(scaling_factor=1 / latents.std().item())
    latents = latents * vae.config.scaling_factor
    ids = tokenizer(captions + [""], padding="max_length", return_tensors="pt").input_ids

    params = [*unet.parameters(), *text_encoder.parameters()]
    average = [p.detach().clone() for p in params]  # EMA, decay warming up to 0.999
    step = optimize(params, unet_steps)
    unet.train()
    text_encoder.train()
    for i in (bar := tqdm(range(unet_steps), desc="pretrain UNet + text encoder")):
        j = torch.randint(len(latents), (128,), generator=generator)
        caption_ids = torch.where(torch.rand(128, 1, generator=generator) < 0.1, ids[-1], ids[j])
        noise = torch.randn(latents[j].shape, generator=generator).to(device)
        t = torch.randint(pipe.scheduler.config.num_train_timesteps, (128,), generator=generator)
        j, caption_ids, t = j.to(device), caption_ids.to(device), t.to(device)
        noisy = pipe.scheduler.add_noise(latents[j], noise, t)
        prediction = unet(noisy, t, text_encoder(caption_ids).last_hidden_state).sample
        loss = F.mse_loss(prediction, noise)
        step(loss)
        with torch.no_grad():
            torch._foreach_lerp_(average, params, 1 - min(0.999, (1 + i) / (10 + i)))
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log.setdefault("unet_loss", []).append(loss.item())
    with torch.no_grad():
        for p, a in zip(params, average):
            p.copy_(a)
    pipe.to(torch.float16).save_pretrained(out)
    with open(os.path.join(out, "pretraining.json"), "w") as f:
        json.dump(log, f)
    return log


LEARNED_REWARD = "learned_reward"  # .safetensors (weights) and .json (training log) in tiny-shapes/


def train_learned_reward(folder, seeds=48, held_out_seeds=12, epochs=60, seed=0):
    """Train LearnedReward on the pretrained model's own samples, labelled by the analyser (the
    standardised alignment of `shapes_reward`): every caption at `seeds` seeds (DDIM 20 steps,
    guidance 4, eta 1: what --tiny samples), the last `held_out_seeds` of each caption kept out of
    training to measure agreement. Saves the weights (half precision) and a log with the
    agreement and the fixed constants that standardise its scores, as ImageReward's are."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    from tqdm import tqdm

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for s in tqdm(range(seeds), desc="sampling the pretrained model"):
        images.append(pipe(CAPTIONS, num_inference_steps=20, guidance_scale=4.0, eta=1.0,
                           generator=torch.Generator().manual_seed(s), output_type="pt").images)
    images = torch.stack(images)  # (seeds, captions, 3, 32, 32)
    labels = torch.stack([shapes_reward(x, CAPTIONS) for x in images])  # (seeds, captions)
    train = seeds - held_out_seeds
    x, y = images[:train].flatten(0, 1), labels[:train].flatten()
    prompts = CAPTIONS * train
    torch.manual_seed(seed)
    model = LearnedReward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    log = dict(seeds=seeds, held_out_seeds=held_out_seeds, epochs=epochs, seed=seed, loss=[])
    for _ in tqdm(range(epochs), desc="training the learned reward"):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            # the analyser does not see rotations and mirror images: neither should the model
            k, flip = torch.randint(4, (2,), generator=generator).tolist()
            inputs = torch.rot90(x[batch], k, dims=(2, 3))
            inputs = inputs.flip(3) if flip % 2 else inputs
            loss = F.mse_loss(model(inputs, [prompts[i] for i in batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            log["loss"].append(loss.item())
    model.eval()
    with torch.no_grad():
        fitted = model(x, prompts)
        held = torch.stack([model(images[s], CAPTIONS) for s in range(train, seeds)])
    log["standardise"] = dict(mean=fitted.mean().item(), std=fitted.std().item())
    log["agreement"] = agreement(held, labels[train:])
    log["agreement_on_training"] = agreement(fitted.view(train, -1), labels[:train])
    save_file({k: v.half() for k, v in model.state_dict().items()},
              os.path.join(folder, LEARNED_REWARD + ".safetensors"))
    with open(os.path.join(folder, LEARNED_REWARD + ".json"), "w") as f:
        json.dump(log, f)
    return log


def agreement(scores, labels):
    """Of scores and analyser labels, each (seeds, captions): Pearson's r over all, and the
    ranking accuracy over pairs of one caption's samples whose labels differ."""
    r = torch.corrcoef(torch.stack([scores.flatten(), labels.flatten()]))[0, 1].item()
    right = total = 0
    for c in range(labels.shape[1]):
        ds, dl = scores[:, c, None] - scores[None, :, c], labels[:, c, None] - labels[None, :, c]
        mask = dl > 1e-6
        right += (ds[mask] > 0).sum().item()
        total += mask.sum().item()
    return dict(pearson_r=r, ranking_accuracy=right / max(total, 1), pairs=total)


def learned_reward(device="cpu", folder=TINY_DEFAULTS["model"]):
    """The learned reward of the shapes world (`--reward shapes-learned`), from its shipped
    weights: LearnedReward's score standardised by fixed constants of its training data."""
    from safetensors.torch import load_file

    model = LearnedReward()
    model.load_state_dict({k: v.float() for k, v in
                           load_file(os.path.join(folder, LEARNED_REWARD + ".safetensors")).items()})
    model.to(device).eval()
    with open(os.path.join(folder, LEARNED_REWARD + ".json")) as f:
        constants = json.load(f)["standardise"]
    return lambda images, prompts: (model(images.to(device), prompts) - constants["mean"]) / constants["std"]


def eval_tiles(folder):
    """The images of an --eval's grids (eval.png, or eval_NNN.png per prompt when several):
    {(prompt, "pretrained" or "finetuned"): (n, 3, SIZE, SIZE)}."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    with open(os.path.join(folder, "eval.json")) as f:
        evaluation = json.load(f)
    n, rows = evaluation["args"]["eval_samples"], evaluation["results"]
    tiles = {}
    for p, row in enumerate(rows):  # save_image's grid: 2-pixel padding
        name = "eval.png" if len(rows) == 1 else f"eval_{p:03d}.png"
        grid = to_tensor(Image.open(os.path.join(folder, name)).convert("RGB"))
        for k, name in enumerate(("pretrained", "finetuned")):
            top = 2 + k * (SIZE + 2)
            tiles[row["prompt"], name] = torch.stack(
                [grid[:, top:top + SIZE, 2 + i * (SIZE + 2):2 + i * (SIZE + 2) + SIZE] for i in range(n)])
    return tiles


def breakdown(folder, quiet=False):
    """The analyser's scores, averaged, of the pretrained and fine-tuned rows of an --eval of the
    shapes world (`python offline.py --breakdown FOLDER` reads FOLDER/eval.json and eval.png)."""
    table = {}
    for (prompt, name), images in eval_tiles(folder).items():
        scores = analyse(images, [prompt] * len(images))
        table[prompt, name] = {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}
        if not quiet:
            print(f"{prompt:24} {name:10}", " ".join(f"{key} {v:.3f}" for key, v in table[prompt, name].items()))
    return table


# ----------------------------------------------------------------------------------------------
# Results: every run, table and figure of the README's "Results", remade by one command
#     python offline.py --results results --jobs 2
# Runs go several at a time (each on cores / jobs threads), each a dpok.py process writing to
# its own folder; a run whose evaluations exist is skipped, one interrupted resumes.

RESULTS_PROMPT = "three green squares"  # the caption whose count the pretrained model gets most wrong
BETAS = ("0", "0.01", "0.1", "1")
# The supervised baseline's own calibration (learning rate, gamma = its KL weight; the paper
# swept gamma over 0.1-5 and ran it at twice the RL learning rate), at the first seed.
SUPERVISED_GRID = [(lr, gamma) for lr in ("3e-5", "1e-4", "3e-4") for gamma in ("0.1", "1", "5")]
# Multi-prompt DPOK: the official multi-prompt recipe's reward_weight / kl_weight (1000 / 0.1, ten
# times the single-prompt ratio) at the tiny reward_alpha of 10; 16 captions, one each per iteration.
MULTI_BETA = "0.001"


def results_runs(seeds, horizon=300, out=None):
    """name -> dict(reward, flags, evals[, prompt, groups]): the dpok.py flags of each run, the
    iterations at which it is evaluated, its training prompt (default RESULTS_PROMPT) and eval
    prompts files ({group: file}, default RESULTS_PROMPT alone). Seed-major within each experiment,
    so that an interrupted command has whole seeds done. Once the baseline's calibration is
    evaluated in `out`, its best setting joins at the other seeds and on the multi-prompt task."""
    runs, half = {}, max(1, horizon // 2)
    for seed in map(str, seeds):  # over-optimisation: the learned reward, evaluated along training
        for beta in BETAS:
            runs[f"learned_b{beta}_s{seed}"] = dict(
                reward="shapes-learned", flags=["--kl-beta", beta, "--seed", seed],
                evals=sorted({max(1, horizon * k // 4) for k in (1, 2, 3, 4)}))
    for seed in map(str, seeds):  # DPOK vs supervised on the analyser, at equal reward queries
        for beta in BETAS[:3]:
            runs[f"shapes_b{beta}_s{seed}"] = dict(
                reward="shapes", flags=["--kl-beta", beta, "--seed", seed], evals=[half])
    for seed in map(str, seeds):  # the quick start (shapes_b0.01) in half precision
        runs[f"shapes_bf16_b0.01_s{seed}"] = dict(
            reward="shapes", flags=["--kl-beta", "0.01", "--dtype", "bfloat16", "--seed", seed], evals=[half])

    def add_supervised(lr, gamma, seed):
        runs[f"supervised_lr{lr}_g{gamma}_s{seed}"] = dict(reward="shapes", evals=[half], flags=[
            "--supervised", "--supervised-samples", str(half * 16), "--lr", lr, "--kl-beta", gamma,
            "--seed", str(seed)])
        return evaluated(os.path.join(out or "", f"supervised_lr{lr}_g{gamma}_s{seed}"), half)

    calibration = [add_supervised(lr, gamma, seeds[0]) for lr, gamma in SUPERVISED_GRID]
    # The value function on and off (official v_flag), single-prompt (beside shapes_b0.01) and
    # multi-prompt; multi-prompt DPOK (and below, the supervised baseline) trains on the trained
    # captions and is evaluated on all three groups, at equal reward queries.
    multi = dict(reward="shapes", evals=[horizon], prompt=["--prompts", PROMPT_FILES["trained"]],
                 groups=PROMPT_FILES)
    for seed in map(str, seeds):
        runs[f"shapes_novalue_b0.01_s{seed}"] = dict(
            reward="shapes", flags=["--kl-beta", "0.01", "--no-value", "--seed", seed], evals=[half])
        runs[f"multi_b{MULTI_BETA}_s{seed}"] = dict(multi, flags=["--kl-beta", MULTI_BETA, "--seed", seed])
        runs[f"multi_novalue_b{MULTI_BETA}_s{seed}"] = dict(
            multi, flags=["--kl-beta", MULTI_BETA, "--no-value", "--seed", seed])
    if out is not None and all(map(os.path.exists, calibration)):
        gains = [json.load(open(path))["results"][0]["reward_gain"] for path in calibration]
        lr, gamma = SUPERVISED_GRID[gains.index(max(gains))]
        for seed in seeds[1:]:
            add_supervised(lr, gamma, seed)
        for seed in map(str, seeds):  # the same number of images per caption as DPOK's queries
            runs[f"multi_supervised_s{seed}"] = dict(multi, flags=[
                "--supervised", "--supervised-samples", str(horizon), "--lr", lr, "--kl-beta", gamma,
                "--seed", seed])
    return runs


def evaluated(folder, k, group=""):
    """The eval.json of a Results run's evaluation at iteration k on a group's prompts file (the
    single prompt: no group); it exists once that is done."""
    return os.path.join(folder, f"eval_{k:04d}", group, "eval.json")


def run_experiment(folder, spec, eval_samples, threads):
    """Train to each evaluation point in turn (resuming, which is exact) and evaluate there on
    the same eval_samples seeds (eval --seed 0) as every other run."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    dpok = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpok.py"),
            "--tiny", "--reward", spec["reward"]]
    groups = {group: ["--prompts", path] for group, path in spec.get("groups", {}).items()}
    groups = groups or {"": ["--prompt", RESULTS_PROMPT]}
    # on the 36 captions of the groups a quarter of the single prompt's seeds each (64: 16)
    samples = str(max(2, eval_samples // 4) if spec.get("groups") else eval_samples)
    with open(folder + ".log", "a") as log:
        for k in spec["evals"]:
            todo = [group for group in groups if not os.path.exists(evaluated(folder, k, group))]
            if not todo:
                continue
            again = "--resume" if os.path.exists(os.path.join(folder, "checkpoint.pt")) else "--overwrite"
            commands = [dpok + spec.get("prompt", ["--prompt", RESULTS_PROMPT]) + spec["flags"]
                        + ["--iterations", str(k), "--out", folder, again]]
            commands += [dpok + groups[group] + ["--eval", "--lora", folder, "--eval-samples", samples,
                                                  "--out", os.path.dirname(evaluated(folder, k, group))]
                         for group in todo]
            for command in commands:
                subprocess.run(command, stdout=log, stderr=log, env=env, check=True)


def reproduce(out, seeds=(0, 1, 2), jobs=2, horizon=300, eval_samples=64):
    """Run every Results run not done yet, `jobs` at a time, then print the tables and draw the
    figures; returns the tables' rows."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    for _ in range(2):  # the second pass: the calibrated baseline at the other seeds, multi-prompt
        runs = results_runs(seeds, horizon, out)
        todo = {name: spec for name, spec in runs.items() if not all(
            os.path.exists(evaluated(os.path.join(out, name), k, group))
            for k in spec["evals"] for group in spec.get("groups", [""]))}
        pool = ThreadPoolExecutor(jobs)
        futures = {pool.submit(run_experiment, os.path.join(out, name), spec, eval_samples, threads):
                   name for name, spec in todo.items()}
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="results runs"):
                if future.exception() is not None:  # the run's log says why; the others go on
                    print(f"{futures[future]} failed ({future.exception()}); see {out}/{futures[future]}.log")
        except KeyboardInterrupt:  # Ctrl-C reached the runs too: each saves a checkpoint and stops
            pool.shutdown(cancel_futures=True)
            raise SystemExit("interrupted: the runs in flight saved a checkpoint; the same command "
                             "continues them and skips what is done")
        pool.shutdown()
    return results_tables(out, runs)


def mean_std(values):
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), (values.std().item() if len(values) > 1 else 0.0)


def results_tables(out, runs):
    """The README's tables (mean +- standard deviation over seeds) and figures, from the runs'
    eval.json files and eval grids."""
    evals = {}  # (run without seed, iteration) -> list over seeds of dict(eval row + breakdown)
    for name, spec in runs.items():
        for k in spec["evals"]:
            path = evaluated(os.path.join(out, name), k)
            if not os.path.exists(path):
                continue
            folder = os.path.dirname(path)
            with open(path) as f:
                row = dict(json.load(f)["results"][0], folder=folder)
            with open(os.path.join(out, name, "metrics.jsonl")) as f:  # training speed, rounding gap
                metrics = [json.loads(line) for line in f]
            row.update(seconds=sorted(m["seconds"] for m in metrics)[len(metrics) // 2],
                       max_rescore_gap=max(m.get("max_rescore_gap", 0.0) for m in metrics))
            analysed = breakdown(folder, quiet=True)
            for when in ("pretrained", "finetuned"):
                row.update({f"{key}_{when}": v for key, v in analysed[RESULTS_PROMPT, when].items()})
            evals.setdefault((name.rsplit("_s", 1)[0], k), []).append(row)

    def cell(rows, key):  # one seed: no spread to show
        mean, std = mean_std([r[key] for r in rows])
        if key.startswith("max_"):  # a rounding gap: its order of magnitude, the largest seed's
            return f"{max(r[key] for r in rows):.1e}"
        return f"{mean:{'+' if key.endswith('gain') else ''}.3f}" + f" ± {std:.3f}" * (len(rows) > 1)

    last = {run: max(k for r, k in evals if r == run) for run, _ in evals}
    tables = {}
    for title, kinds, keys in (
            ("Over-optimisation: DPOK with the learned reward", ("learned_b",), [
                ("learned reward gain", "reward_gain"), ("judge gain", "judge_gain"),
                ("count", "count_finetuned"), ("objects found", "objects_finetuned"),
                ("exact", "exact_finetuned"), ("fidelity", "fidelity_finetuned"), ("KL bound", "kl_bound")]),
            ("DPOK and supervised with the analyser's reward", ("shapes_b", "supervised"), [
                ("alignment gain", "reward_gain"), ("count", "count_finetuned"), ("exact", "exact_finetuned"),
                ("fidelity", "fidelity_finetuned"), ("KL bound", "kl_bound")]),
            ("The value function on and off, single prompt", ("shapes_b0.01", "shapes_novalue"), [
                ("alignment gain", "reward_gain"), ("exact", "exact_finetuned"),
                ("fidelity", "fidelity_finetuned"), ("KL bound", "kl_bound")]),
            ("Half precision: the quick start in float32 and bfloat16", ("shapes_b0.01", "shapes_bf16"), [
                ("alignment gain", "reward_gain"), ("exact", "exact_finetuned"),
                ("fidelity", "fidelity_finetuned"), ("KL bound", "kl_bound"),
                ("s / iteration (median)", "seconds"), ("max rescore gap", "max_rescore_gap")])):
        final = {run: evals[run, k] for run, k in last.items() if run.startswith(kinds)}
        if not final:
            continue
        pre = next(iter(final.values()))[0]  # every run's eval has the same pretrained samples
        print(f"\n{title} (mean ± std over seeds)\n\n| run | iterations | seeds | "
              + " | ".join(name for name, _ in keys) + " |\n|" + "---|" * (len(keys) + 3))
        print("| pretrained | 0 | | " + " | ".join(
            "0" if key == "kl_bound" else f"({pre[key.replace('gain', 'pretrained')]:.3f})"
            if key.endswith("gain") else f"{pre[key.replace('finetuned', 'pretrained')]:.3f}"
            if key.endswith("finetuned") else "" for _, key in keys) + " |")
        for run, rows in final.items():
            print(f"| {run} | {last[run]} | {len(rows)} | " + " | ".join(cell(rows, key) for _, key in keys) + " |")
        tables[title] = final
    multi = {}  # (group, run without seed) -> the group's mean row of each seed's last eval
    for name, spec in runs.items():
        for group in spec.get("groups", {}):
            if os.path.exists(path := evaluated(os.path.join(out, name), spec["evals"][-1], group)):
                with open(path) as f:
                    multi.setdefault((group, name.rsplit("_s", 1)[0]), []).append(json.load(f)["mean"])
    if multi:
        print("\nMulti-prompt: each group's mean over its captions (mean ± std over seeds)\n\n"
              "| group (captions) | run | seeds | alignment gain | its standard error (a seed's, mean) | fidelity "
              "| KL bound |\n|---|---|---|---|---|---|---|")
        for group in PROMPT_FILES:
            with open(PROMPT_FILES[group]) as f:
                label = f"{group} ({len([line for line in f if line.strip()])})"
            pre = [rows[0] for (g, _), rows in multi.items() if g == group][:1]
            if pre:
                print(f"| {label} | pretrained | | ({pre[0]['reward_pretrained']:.3f}) | | "
                      f"{pre[0]['fidelity_pretrained']:.3f} | 0 |")
            for (g, run), rows in multi.items():
                if g == group:
                    print(f"| {label} | {run} | {len(rows)} | {cell(rows, 'reward_gain')} | "
                          f"{mean_std([r['reward_gain_se'] for r in rows])[0]:.3f} | " + " | ".join(
                              cell(rows, key) for key in ("fidelity_finetuned", "kl_bound")) + " |")
        tables["Multi-prompt"] = multi
    value_figure(out, runs)
    if any(run.startswith("learned") for run, _ in evals):
        hack_table({run: [r["folder"] for r in rows] for run, rows in tables[
            "Over-optimisation: DPOK with the learned reward"].items()})
        overoptimisation_figure(out, evals)
    return tables


def value_figure(out, runs):
    """Learning curves with the value function on and off: each iteration's mean alignment (a
    moving mean over 10 iterations), mean +- std over seeds; single prompt and multi-prompt."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5))
    panels = ((f"one prompt: {RESULTS_PROMPT}", "shapes_b0.01", "shapes_novalue_b0.01"),
              ("multi-prompt: the 16 trained captions", f"multi_b{MULTI_BETA}", f"multi_novalue_b{MULTI_BETA}"))
    drawn = False
    for ax, (title, *pair) in zip(figure.subplots(1, 2), panels):
        for run, label, colour in zip(pair, ("value function (official v_flag 1)", "--no-value"), ("C0", "C1")):
            curves = []
            for name in runs:
                if name.rsplit("_s", 1)[0] == run and os.path.exists(path := os.path.join(out, name, "metrics.jsonl")):
                    with open(path) as f:
                        curves.append(torch.tensor([json.loads(line)["reward_mean"] for line in f]))
            if not curves:
                continue
            n = min(map(len, curves))
            window = min(10, n)
            curves = F.avg_pool1d(torch.stack([c[:n] for c in curves])[:, None], window, 1)[:, 0]
            mean, std = curves.mean(0), (curves.std(0) if len(curves) > 1 else torch.zeros(curves.shape[1]))
            x = torch.arange(len(mean)) + window - 1  # the window's last iteration
            ax.plot(x, mean, color=colour, label=f"{label} ({len(curves)} seeds)")
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.25)
            drawn = True
        ax.set(title=title, xlabel="iteration", ylabel="alignment of the iteration's samples")
        ax.grid(alpha=0.3)
        ax.legend()
    if drawn:
        figure.savefig(os.path.join(out, "value_function.png"), dpi=100, bbox_inches="tight")


def hack_table(folders):
    """What the learned reward and the judge say of eval samples with 1, 2, 3 and 4+ objects
    found (pooled over seeds): does the reward rate a wrong count as the judge does?"""
    reward = learned_reward()
    groups = {}  # (run, objects) -> [(learned, judge)]
    for run, paths in [("pretrained", list(folders.values())[0][:1]), *folders.items()]:
        for path in paths:
            images = eval_tiles(path)[RESULTS_PROMPT, "pretrained" if run == "pretrained" else "finetuned"]
            prompts = [RESULTS_PROMPT] * len(images)
            scores = torch.stack([reward(images, prompts), shapes_reward(images, prompts)], 1)
            for s, score in zip(analyse(images, prompts), scores.tolist()):
                groups.setdefault((run, min(s["objects"], 4)), []).append(score)
    print("\nLearned reward / judge by the number of objects found (images: mean learned reward / "
          "mean judge), last evaluation, seeds pooled\n\n| run | 1 | 2 | 3 | 4 or more |\n|---|---|---|---|---|")
    for run in ["pretrained", *folders]:
        print(f"| {run} | " + " | ".join(
            f"{len(g)}: {sum(a for a, _ in g) / len(g):+.2f} / {sum(b for _, b in g) / len(g):+.2f}"
            if (g := groups.get((run, n))) else "0" for n in (1, 2, 3, 4)) + " |")
    return groups


def overoptimisation_figure(out, evals):
    """Gao et al. (2022)'s figure in miniature: the learned reward and the judge of the samples
    against the KL bound from the pretrained model (and below, against the iteration), one line
    per beta, a point per evaluation (mean +- std over seeds); and an eval grid: pretrained / beta 0 / the beta whose judge gained
    most, the first 16 eval seeds of training seed 0, 4x nearest."""
    from matplotlib.figure import Figure
    from torchvision.utils import save_image

    figure = Figure(figsize=(10, 8))
    axes = figure.subplots(2, 2)  # columns: reward, judge; rows: against the KL, the iteration
    best, best_judge = None, -float("inf")
    for column, key in enumerate(("reward", "judge")):
        for beta in BETAS:
            points = sorted((k, rows) for (run, k), rows in evals.items() if run == f"learned_b{beta}")
            if not points:
                continue
            pre = mean_std([r[f"{key}_pretrained"] for r in points[0][1]])[0]
            y = [(pre, 0.0)] + [mean_std([r[f"{key}_finetuned"] for r in rows]) for _, rows in points]
            for row, x in enumerate(([(0.0, 0.0)] + [mean_std([r["kl_bound"] for r in rows]) for _, rows in points],
                                     [(0, 0.0)] + [(k, 0.0) for k, _ in points])):
                axes[row, column].errorbar(
                    [m for m, _ in x], [m for m, _ in y], xerr=[s for _, s in x], yerr=[s for _, s in y],
                    marker="o", capsize=2, label=f"β = {beta}")
            if key == "judge" and y[-1][0] > best_judge and beta != "0":
                best, best_judge = beta, y[-1][0]
    for i, ax in enumerate(axes.flat):
        row, column = divmod(i, 2)
        if row == 0:  # Gao et al. plot against the square root of the KL; ticks at squares
            ax.set_xscale("function", functions=(lambda v: v.clip(0) ** 0.5, lambda v: v**2))
            top = max(ax.get_xlim()[1], 1) ** 0.5
            step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500) if top / s <= 6)
            ax.set_xticks([(k * step) ** 2 for k in range(int(top / step) + 1)])
        ax.set(xlabel=("KL bound from the pretrained model (nats, √ axis)", "iteration")[row],
               ylabel=("learned reward (trained on)", "judge: the analyser (held out)")[column])
        ax.grid(alpha=0.3)
        ax.legend()
    figure.savefig(os.path.join(out, "overoptimisation.png"), dpi=100, bbox_inches="tight")
    last = {run: max(k for r, k in evals if r == run) for run, _ in evals}
    rows = []
    for run in ("learned_b0", f"learned_b{best}"):
        if run in last and os.path.exists(folder := os.path.join(out, run + "_s0", f"eval_{last[run]:04d}")):
            tiles = eval_tiles(folder)
            rows += [tiles[RESULTS_PROMPT, "pretrained"][:16]] * (not rows) + [tiles[RESULTS_PROMPT, "finetuned"][:16]]
    if rows:
        grid = F.interpolate(torch.cat(rows), scale_factor=4, mode="nearest")
        save_image(grid, os.path.join(out, "overoptimisation_eval.png"), nrow=min(16, len(rows[0])), pad_value=1)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Pretrain the shapes world (the model of --tiny)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "tiny-shapes"))
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--unet-steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--breakdown", metavar="FOLDER", help="analyse an --eval's eval.png instead")
    parser.add_argument("--learned-reward-only", action="store_true",
                        help="only (re)train the learned reward on the pretrained model in --out")
    parser.add_argument("--results", metavar="FOLDER",
                        help="remake every run, table and figure of the README's Results in FOLDER")
    parser.add_argument("--jobs", type=int, default=2, help="--results: runs at a time")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--results: seeds")
    parser.add_argument("--horizon", type=int, default=300,
                        help="--results: iterations of the learned-reward runs (the others: half)")
    parser.add_argument("--eval-samples", type=int, default=64, help="--results: eval seeds")
    args = parser.parse_args()
    if args.results:
        reproduce(args.results, args.seeds, args.jobs, args.horizon, args.eval_samples)
    elif args.breakdown:
        breakdown(args.breakdown)
    else:  # the model, then the learned reward on its samples
        if not args.learned_reward_only:
            pretrain(args.out, args.vae_steps, args.unet_steps, args.seed, args.device)
        torch.set_num_threads(1)  # small enough: the same numbers on any number of cores
        log = train_learned_reward(args.out, seed=args.seed)
        print("learned reward, held-out samples:", log["agreement"])
