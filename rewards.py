"""The rewards of the real world, for any model: what `dpok.py --reward NAME` trains on.

- `imagereward`: ImageReward-v1.0 (Xu et al. 2023), the paper's reward, with the LAION aesthetic
  score beside it as the fidelity measure (paper Sec. 5);
- `aesthetic`: the LAION aesthetic score as the reward (DDPO's aesthetic task);
- `compressibility`: DDPO's JPEG compressibility, weight-free.

A reward takes images (B, 3, H, W) in [0, 1] and B prompts and returns B scores; it is not
differentiated. ImageReward and the aesthetic predictor come from the image-reward package and
download on first use. A user's own reward needs no entry here: `--reward FILE.py:FUNCTION`.
"""

import importlib
import importlib.util
import io
import os
import sys
import warnings

import torch
import torch.nn.functional as F
import torchvision.transforms as T


def preprocess_batch(preprocess, images):
    """A scorer's own preprocessing (resize 224 bicubic, centre crop, normalise) on a batch of
    tensors in [0, 1], its PIL conversions skipped; equal to the PIL path up to rounding (tested)."""
    on_tensors = (T.Resize, T.CenterCrop, T.Normalize)
    return T.Compose([t for t in preprocess.transforms if isinstance(t, on_tensors)])(images.float())


def image_reward_package():
    with warnings.catch_warnings():  # its `clip` dependency warns about pkg_resources
        warnings.simplefilter("ignore")
        import ImageReward
    return ImageReward


def imagereward_reward(device, model=None):
    """ImageReward-v1.0, downloaded (~1.7 GB) on first use; `model` lets a test pass one built
    offline. Its scores are standardised by the package. The whole batch in one BLIP forward
    (the package's `score` takes one image)."""
    try:
        model = model or image_reward_package().load("ImageReward-v1.0", device=device)
    except Exception as e:  # not installed, or offline before its first download
        raise RuntimeError(f"cannot load ImageReward-v1.0 ({type(e).__name__}); it downloads on "
                           "first use, so connect once, or run offline with --tiny") from e

    def reward(images, prompts):
        text = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                    return_tensors="pt").to(device)
        return model.score_gard(text.input_ids, text.attention_mask,
                                preprocess_batch(model.preprocess, images).to(device)).squeeze(1)
    return reward


def aesthetic_score(device, model=None):
    """The LAION aesthetic predictor (CLIP ViT-L/14 + an MLP) of image-reward, downloaded on first
    use; it does not read the prompts. The batch in one CLIP forward, as its `score` does one file."""
    try:
        model = model or image_reward_package().load_score("Aesthetic", device=device)
    except Exception as e:  # offline before its first download
        raise RuntimeError(f"cannot load the aesthetic predictor ({type(e).__name__}); it downloads "
                           "on first use, so connect once, or run offline with --tiny") from e
    pixels = lambda images: preprocess_batch(model.preprocess, images).to(device, model.clip_model.dtype)
    return lambda images, prompts: model.mlp(F.normalize(
        model.clip_model.encode_image(pixels(images))).float()).squeeze(1)


def fidelity(device):
    """The aesthetic score as ImageReward's held-out fidelity measure; offline, a note and none."""
    try:
        return dict(fidelity=aesthetic_score(device))
    except RuntimeError as e:  # rank 0 alone speaks, as dpok.py does
        if os.environ.get("RANK", "0") == "0":
            print(f"dpok: note: no aesthetic score ({type(e.__cause__).__name__})", file=sys.stderr)
        return {}


def compressibility_reward(images, prompts):
    """DDPO's JPEG compressibility: minus the file size in kB at quality 95."""
    from torchvision.transforms.functional import to_pil_image

    sizes = []
    for image in images:
        buffer = io.BytesIO()
        to_pil_image(image.float().cpu()).save(buffer, format="JPEG", quality=95)
        sizes.append(-buffer.tell() / 1000)
    return torch.tensor(sizes)


# {--reward: fn(device) -> (reward, {name: held-out measure, scored beside it, never trained on})}
REWARDS = {"imagereward": lambda device: (imagereward_reward(device), fidelity(device)),
           "aesthetic": lambda device: (aesthetic_score(device), {}),
           "compressibility": lambda device: (compressibility_reward, {})}
SHAPES_REWARDS = ("shapes", "shapes-learned")  # shapes.REWARDS, imported only when used


def load(spec, device, prompts):
    """What `dpok.py --reward SPEC` trains on: (reward, {name: held-out measure}). SPEC is a name
    of REWARDS or shapes.REWARDS (the shapes world's), or a user's reward, FILE.py:FUNCTION or
    module:function, with no measures, tried first on 2 random images with the run's first
    prompt: it must return one score per image. Raises with a one-line message."""
    source, _, name = spec.rpartition(":")
    if not source and name not in REWARDS and name not in SHAPES_REWARDS:
        raise ValueError(f"unknown reward {name!r}: one of {', '.join([*REWARDS, *SHAPES_REWARDS])}, "
                         "or FILE.py:FUNCTION")
    if not source and name in SHAPES_REWARDS:  # the shapes world reads its captions alone
        shapes = importlib.import_module("shapes")
        [shapes.parse_caption(prompt) for prompt in prompts]  # each one: ValueError otherwise
        return shapes.REWARDS[name](device)
    if not source:
        return REWARDS[name](device)
    if source.endswith(".py"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no file {source}")
        module_spec = importlib.util.spec_from_file_location(os.path.basename(source)[:-3], source)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    if not callable(reward := getattr(module, name, None)):
        raise AttributeError(f"{source} has no function {name!r}")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    if (shape := tuple(torch.as_tensor(reward(images, prompts[:1] * 2)).shape)) != (2,):
        raise ValueError(f"returned shape {shape} for 2 images; it must return one score per image")
    return reward, {}
