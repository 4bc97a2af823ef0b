"""The shapes world: dpok.py's offline world, a text-to-image task that needs no download.

Captions like "two red circles" and 32 px images of coloured shapes made in code; `pretrain`
trains a tiny text-to-image model of Stable Diffusion's own component types on them from scratch
(`python shapes.py` remakes the shipped `tiny-shapes/` folder, about 8 minutes on 2 CPU cores).
`shapes_reward` judges prompt alignment with an analyser that needs no weights, `clean_fraction`
is its fidelity measure, and `LearnedReward` its learned reward (`--reward shapes-learned`),
fitted to the analyser's scores of the pretrained model's samples, as ImageReward was fitted to
people's ratings. `TINY_DEFAULTS` are the hyperparameters `--tiny` trains with.
"""

import json
import os

import torch
import torch.nn.functional as F

from architectures import clip_text_model, clip_tokenizer, sd_pipeline

# Defaults of dpok.py --tiny, calibrated on 2 CPU cores (README "Deviations" 8): the shipped
# model of the shapes world, its reward, and a small model's far larger learning rate.
TINY_DEFAULTS = dict(
    model=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny-shapes"),
    reward="shapes", steps=20, guidance=4.0, samples_per_iter=16, buffer_size=640,
    policy_steps=2, grad_accum=2, batch_size=32, ratio_clip=0.2, reward_alpha=10.0,
    kl_beta=0.03,  # the paper's 0.01 let one training seed in ten drift off (RESULTS.md, Stability)
    lr=6e-4, iterations=120,  # twice the rate for fewer iterations: more gain, less drift (ibid.)
    value_steps=10, value_batch_size=128, value_lr=1e-3, save_every=25,
    supervised_samples=1600, eval_samples=64,
)


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
        raise ValueError(f"the shapes world reads captions like 'two red circles' (one|two|three, "
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


def exact_rate(images, prompts):
    """A gold measure a person would agree with: 1 for an image whose colour, count and every
    shape are right (the analyser's exact), else 0. Four squares asked for three is wrong here,
    where the judge's graded count gives it half the count credit."""
    return torch.tensor([s["exact"] for s in analyse(images, prompts)])


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


# dpok.py's offline rewards, {--reward: fn(device) -> (reward, held-out measures)}, the measures
# never trained on: the clean fraction (fidelity) and, beside the learned reward, the analyser
# as the judge and its exact rate as the gold measure. Rewards take images (B, 3, H, W) in
# [0, 1] and B prompts.
REWARDS = {"shapes": lambda device: (shapes_reward, dict(fidelity=clean_fraction)),
           "shapes-learned": lambda device: (learned_reward(device), dict(
               judge=shapes_reward, exact=exact_rate, fidelity=clean_fraction))}


def main(argv=None):
    """python shapes.py: pretrain the shapes world into --out (the shipped tiny-shapes/), then its
    learned reward on the model's samples. Bad input is one line, exit 2, before any work."""
    import argparse
    import re
    import sys

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            sys.exit(print(f"shapes.py: error: {message}", file=sys.stderr) or 2)

    parser = Parser(description="Pretrain the shapes world (the model of dpok.py --tiny) and its "
                    "learned reward")
    parser.add_argument("--out", default=TINY_DEFAULTS["model"], help="pipeline folder to write")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--unet-steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--learned-reward-only", action="store_true",
                        help="only (re)train the learned reward on the pretrained model in --out")
    args = parser.parse_args(argv)
    for name in ("vae_steps", "unet_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive whole number")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2^63), got {args.seed}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device) or (
            args.device != "cpu" and (torch.device(args.device).index or 0) >= torch.cuda.device_count()):
        parser.error(f"--device {args.device!r}: use cpu, or a CUDA GPU this machine has")
    model = os.path.join(args.out, "model_index.json")
    if args.learned_reward_only and not os.path.isfile(model):
        parser.error(f"--learned-reward-only: no pretrained pipeline in {args.out} (model_index.json)")
    try:  # the last check: from here on the work writes
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: {e.strerror}")
    if not os.access(args.out, os.W_OK):
        parser.error(f"--out {args.out} is not a writable folder")
    if not args.learned_reward_only:
        pretrain(args.out, args.vae_steps, args.unet_steps, args.seed, args.device)
    torch.set_num_threads(1)  # small enough: the same numbers on any number of cores
    log = train_learned_reward(args.out, seed=args.seed)
    print("learned reward, held-out samples:", log["agreement"])


if __name__ == "__main__":
    main()
