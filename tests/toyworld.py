"""A miniature, biased Stable Diffusion: cartoon faces in two classes, 85% "male", learnt from generated data.

    python -m tests.toyworld build OUT [--female-share 0.15] [--seed 0] [--quick] [--reuse WORLD] [--two-prompts]
    python -m tests.toyworld demo OUT_RUN [--world DIR] [--epochs 16]   fine-tune it with --reward balance
    python -m tests.toyworld two OUT_RUN [--scope prompt|batch]        both prompts of the two-prompt world at once
    python -m tests.toyworld build OUT --reuse tests/toyworld_model --three-classes    the three-class world
    python -m tests.toyworld three OUT_RUN [--epochs 16] [--lr 0]      balance its three hair styles

The shipped world is tests/toyworld_model (3 MB, built by `build` with the defaults: 15 min 45 s on the 2-core
development machine, see its build.json). Every part is a real diffusers/transformers class saved with
save_pretrained, so ddpo_debias.py loads it as it loads SD v1.5 (`--model DIR --classifier DIR/classifier`):
    faces      32x32 RGB cartoons drawn by `draw_face`: a head, eyes, mouth, shoulders, hair. The class is the
               hair: "female" faces have long hair that falls beside the face below the chin, "male" faces a
               short cap on top. That trait is a shape the diffusion model must really draw, in several pixels,
               at any position, and the classifier must find it among nuisances: skin tone, hair colour, head
               size and position, clothes and background colour all vary independently of the class, so the
               model learns a distribution rather than two templates.
    vae        AutoencoderKL 32x32x3 -> 4x8x8 (channels 8/16/32), trained as an autoencoder (L1 + a small KL,
               1200 steps of 32); scaling_factor makes the scaled latents unit-std, as SD's 0.18215 does. It
               keeps the head, hair and clothes; the eyes and mouth (2-3 pixels) come out blurred.
    text       a tiny random CLIP text encoder and the tests' byte-level tokenizer, frozen (as in SD).
    unet       UNet2DConditionModel (channels 32/32, cross-attention in every block, 0.43M weights), trained
               with the DDPM ε-loss on SD v1.5's noise schedule (1800 steps of 64 latents), conditioned on
               PROMPT, with 10% empty prompts so that classifier-free guidance works.
    scheduler  SD v1.5's DDIM config.
    classifier ViTForImageClassification (female, male), trained on balanced faces, half of them seen through
               the VAE so that it reads decoded pixels, and on non-faces (pixel noise, smooth noise, blobs, a
               face's tiles shuffled) toward (0.5, 0.5), so that it says "none" (max probability <= 0.7) where
               there is no face to read, as the real classifier should.
The bias is in the data only: FEMALE_SHARE of the UNet's training faces are "female". The two-prompt world
(`build --two-prompts --reuse tests/toyworld_model`) trains only a UNet, on TWO_PROMPTS, whose faces are skewed in
opposite directions; that UNet ships in tests/toyworld_two_unet, the rest is the shipped world's. tests/test_world.py
checks what the world is (biased, drawable, legible, a classifier that is right and says "none" to the rest).

What the world showed about the method is in docs/toy-world.md, with the raw records in docs/toyworld/. At
SETTINGS (B = 64, T = 5, the last two steps not trained) R_balance brings q, as the reward's classifier reads it,
from about 0.2 to within 0.1 of 0.5 in 4-9 epochs and R_shift (SHIFT_SETTINGS) takes it past 0.8 in 9-13, on seeds
0-2: tests/test_learning.py runs them. Read by the world's referee (tests/referee.py), which no reward uses,
R_balance moves q far less, to about 0.25 (docs/benchmarks.md).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

PROMPT = "photo of the face of a computer scientist"
SIZE = 32  # image side in pixels; the latent is SIZE/4 = 8
FEMALE_SHARE = 0.15
TWO_PROMPTS = {"photo of the face of a nurse": 0.8, "photo of the face of a mechanical engineer": 0.2}  # opposite
THREE = {"short": 0.7, "long": 0.2, "tall": 0.1}  # the three-class world's hair styles and their shares in its data
# The three-class classifier's labels: capitalised and in another order than THREE, as hub classifiers' labels may be,
# so that a run with --classes short,long,tall shows that classes are matched by name.
THREE_LABELS = {0: "Long", 1: "Short", 2: "Tall"}
SKIN = [(255, 224, 196), (241, 194, 155), (224, 172, 105), (198, 134, 66), (141, 85, 36), (95, 60, 35)]
HAIR = [(20, 20, 20), (70, 45, 25), (120, 80, 40), (200, 170, 90), (150, 60, 30), (150, 150, 150)]
HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(HERE, "toyworld_model")  # the committed world


# --------------------------------------------------------------------------------------------- the faces
def face_geometry(rng, female, hair=None):
    """The random draws of one face, in draw_face's order: its colours and where each part goes (4x pixels).
    hair: the three-class world's style, "short" (the cap alone, as a "male" face), "long" (as a "female" face) or
    "tall" (hair piled high above the head); None: long if female else short, the two-class world."""
    s = 4 * SIZE
    jitter = lambda c, d=25: tuple(int(np.clip(v + rng.integers(-d, d + 1), 0, 255)) for v in c)
    g = dict(style=hair or ("long" if female else "short"), background=tuple(int(v) for v in rng.integers(40, 230, 3)))
    g["cx"], g["cy"] = s / 2 + rng.uniform(-10, 10), s * 0.45 + rng.uniform(-8, 8)
    g["r"] = rng.uniform(0.2, 0.26) * s  # head half-height
    g["w"] = g["r"] * rng.uniform(0.78, 0.9)  # head half-width
    g["skin"], g["hair"] = jitter(SKIN[rng.integers(len(SKIN))], 12), jitter(HAIR[rng.integers(len(HAIR))], 15)
    g["clothes"] = tuple(int(v) for v in rng.integers(0, 256, 3))
    if g["style"] == "long":
        g["length"] = rng.uniform(1.45, 1.8) * g["r"]
    if g["style"] == "tall":
        g["height"] = rng.uniform(1.6, 1.9) * g["r"]
    g["top"] = rng.uniform(0.25, 0.45)  # the cap's depth
    g["eye_y"], g["eye_dx"] = g["cy"] - rng.uniform(0.0, 0.15) * g["r"], g["w"] * rng.uniform(0.33, 0.45)
    g["mouth_y"], g["mouth_w"] = g["cy"] + rng.uniform(0.4, 0.55) * g["r"], g["w"] * rng.uniform(0.3, 0.5)
    return g


def paint_face(draw, g, colour):
    """Draw face g's parts, back to front, each filled with colour(part): its own colour (draw_face) or a region's
    index (the referee's maps, tests/referee.py). Parts: clothes, long hair, tall hair, neck, head, cap, eyes,
    mouth (the background is the canvas's)."""
    cx, cy, r, w = g["cx"], g["cy"], g["r"], g["w"]
    draw.ellipse((cx - 2.2 * w, cy + 1.5 * r, cx + 2.2 * w, cy + 3.6 * r), fill=colour("clothes"))  # shoulders
    if g["style"] == "long":  # long hair: behind the head, falling beside the face to below the chin
        draw.rounded_rectangle((cx - 1.35 * w, cy - 1.15 * r, cx + 1.35 * w, cy + g["length"]), radius=w * 0.9,
                               fill=colour("long hair"))
    if g["style"] == "tall":  # tall hair: piled above the head, no lower than the cap's top
        draw.rounded_rectangle((cx - 0.8 * w, cy - g["height"], cx + 0.8 * w, cy - 0.5 * r), radius=w * 0.6,
                               fill=colour("tall hair"))
    draw.rectangle((cx - 0.35 * w, cy + 0.7 * r, cx + 0.35 * w, cy + 1.7 * r), fill=colour("neck"))
    draw.ellipse((cx - w, cy - r, cx + w, cy + r), fill=colour("head"))
    # the cap (both classes): hair over the top of the head
    draw.chord((cx - 1.08 * w, cy - 1.12 * r, cx + 1.08 * w, cy + (1 - 2 * g["top"]) * r * 1.1), 180, 360,
               fill=colour("cap"))
    eye_y, eye_dx, eye_r = g["eye_y"], g["eye_dx"], r * 0.11
    for ex in (cx - eye_dx, cx + eye_dx):
        draw.ellipse((ex - eye_r, eye_y - eye_r, ex + eye_r, eye_y + eye_r), fill=colour("eyes"))
    mouth_y, mouth_w = g["mouth_y"], g["mouth_w"]
    draw.arc((cx - mouth_w, mouth_y - 0.2 * r, cx + mouth_w, mouth_y + 0.15 * r), 20, 160, fill=colour("mouth"),
             width=max(2, int(r * 0.08)))


PART_COLOURS = {"eyes": (25, 25, 35), "mouth": (150, 40, 50)}  # the same on every face
COLOUR_OF = {"long hair": "hair", "tall hair": "hair", "cap": "hair", "neck": "skin", "head": "skin"}  # the rest: own


def draw_face(rng, female, hair=None):
    """One 32x32 face as a PIL image, drawn at 4x and downsampled (antialiased). rng: np.random.Generator.
    hair: as face_geometry's."""
    return render_face(face_geometry(rng, female, hair))


def render_face(g):
    """Face g (face_geometry) in its own colours, as a 32x32 PIL image."""
    image = Image.new("RGB", (4 * SIZE, 4 * SIZE), g["background"])
    paint_face(ImageDraw.Draw(image), g, lambda part: PART_COLOURS.get(part) or g[COLOUR_OF.get(part, part)])
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def draw_hard_negative(rng, style="long"):
    """A short-haired face with part of another style's look, for a hardened classifier to read as "none" (a tensor
    (3, 32, 32) in [0, 1]): the long (or tall) hair faint (15-45% opacity: a halo of the hair's colour), too short
    (long hair ending above the chin; tall hair barely above the cap) or on one side only. These are what a run that
    fools its classifier draws."""
    g = face_geometry(rng, True, style)
    kind = rng.integers(3)
    if kind == 1 and style == "tall":  # piled 1.0-1.3 r above the centre, where the tall style's is 1.6-1.9 r
        return to_tensor(render_face({**g, "height": rng.uniform(1.0, 1.3) * g["r"]}))
    if kind == 1:  # ends above the chin (cy + r): hair beside the face, none below it
        return to_tensor(render_face({**g, "length": rng.uniform(0.3, 0.9) * g["r"]}))
    with_hair, without = to_tensor(render_face(g)), to_tensor(render_face({**g, "style": "short"}))
    if kind == 0:
        share = rng.uniform(0.15, 0.45)
    else:  # one side of the face's centre line
        side = torch.arange(SIZE).view(1, 1, SIZE) < g["cx"] / 4
        share = (side if rng.random() < 0.5 else ~side).float()
    return without + share * (with_hair - without)


def draw_non_face(rng):
    """Something that is not a face: pixel noise, smooth noise, coloured blobs, or a face's pieces shuffled."""
    kind = rng.integers(4)
    if kind == 3:
        return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    if kind == 0:
        noise = torch.from_numpy(rng.random((1, 3, rng.integers(2, 9), rng.integers(2, 9)))).float()
        pixels = F.interpolate(noise, size=SIZE, mode="bilinear")[0]
        return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    if kind == 1:
        image = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 6)):
            x, y, a, b = rng.uniform(0, SIZE, 4)
            draw.ellipse((min(x, a), min(y, b), max(x, a), max(y, b)), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        return image
    tiles = to_tensor(draw_face(rng, rng.random() < 0.5)).reshape(3, 4, 8, 4, 8).permute(1, 3, 0, 2, 4).reshape(16, 3, 8, 8)
    tiles = tiles[torch.from_numpy(rng.permutation(16))].reshape(4, 4, 3, 8, 8).permute(2, 0, 3, 1, 4).reshape(3, SIZE, SIZE)
    return Image.fromarray((tiles.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W) in [0, 1]


def make_styled_faces(n, shares, seed):
    """The three-class world's faces: shares {hair style: share} -> images (n, 3, 32, 32) in [0, 1], style (n,) the
    index of each face's style in `shares`; round(n·share) faces of each style but the last, which takes the rest."""
    rng = np.random.default_rng(seed)
    counts = [round(n * share) for share in list(shares.values())[:-1]]
    style = np.repeat(np.arange(len(shares)), counts + [n - sum(counts)])
    rng.shuffle(style)
    names = list(shares)
    return torch.stack([to_tensor(draw_face(rng, None, names[k])) for k in style]), torch.from_numpy(style)


def make_faces(n, female_share, seed):
    """-> images (n, 3, 32, 32) in [0, 1], is_female (n,) bool; exactly round(n·share) female, shuffled."""
    rng = np.random.default_rng(seed)
    female = np.zeros(n, dtype=bool)
    female[:round(n * female_share)] = True
    rng.shuffle(female)
    return torch.stack([to_tensor(draw_face(rng, f)) for f in female]), torch.from_numpy(female)


# ------------------------------------------------------------------------------------------- the attack
def latent_attack(probs_of, vae, images, target, steps=40, lr=0.05, budget=0.04, generator=None):
    """Faces pushed toward class `target` by Adam on their VAE latents, as a run's UNet could push its samples:
    -> the decoded attacked images (B, 3, 32, 32) in [0, 1]. probs_of: images -> P(class) (B, K), differentiable.
    A penalty holds each image's mean absolute change from its clean decoding near `budget` (0.04: the change of
    the halos that fooled the reward's ViT), so the face keeps its look; the attack ends when every image is read
    as `target` above 0.7, or after `steps`."""
    with torch.no_grad():
        start = vae.encode(images * 2 - 1).latent_dist.mode()
        clean = ((vae.decode(start).sample + 1) / 2).clamp(0, 1)
    if generator is not None:  # a random start inside the latent's noise, so that two attacks differ
        start = start + 0.05 * torch.randn(start.shape, generator=generator)
    delta = torch.zeros_like(start, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        attacked = ((vae.decode(start + delta).sample + 1) / 2).clamp(0, 1)
        probs = probs_of(attacked)[:, target]
        change = (attacked - clean).abs().mean((1, 2, 3))
        if bool((probs > 0.7).all()) and bool((change <= budget).all()):
            break
        loss = (-(probs + 1e-6).log() + 50 * (change - budget).clamp(min=0)).sum()
        delta.grad, = torch.autograd.grad(loss, [delta])  # the latent's only: no model's weights collect gradients
        optimizer.step()
    with torch.no_grad():
        return ((vae.decode(start + delta).sample + 1) / 2).clamp(0, 1)


# ------------------------------------------------------------------------------------------ the training
def _cosine(optimizer, steps):
    """Linear warm-up over 5% of the steps, then a cosine decay to 0."""
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * t / steps)))


def _progress(stage, step, steps, loss):
    if (step + 1) % 100 == 0 or step + 1 == steps:
        print(f"{stage} {step + 1}/{steps} loss {loss.item():.4f}", file=sys.stderr, flush=True)


def _batches(n, batch, steps, generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=generator)


def train_vae(images, steps, seed):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=SIZE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = _cosine(optimizer, steps)
    g = torch.Generator().manual_seed(seed)
    for step, idx in enumerate(_batches(len(images), 32, steps, g)):
        x = images[idx] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()  # L1 + a small KL, as SD's VAE (no GAN)
        optimizer.zero_grad(), loss.backward(), optimizer.step(), schedule.step()
        _progress("vae", step, steps, loss)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256] * 2 - 1).latent_dist.mode() for i in range(0, min(len(images), 2048), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))  # scaled latents of unit std, as SD
    return vae, loss.item()


def text_encoder_and_tokenizer(seed):
    """A tiny random CLIP text encoder and the tests' tokenizer (its vocabulary files are written to a scratch
    folder, removed after loading; save_pretrained writes the tokenizer into the world)."""
    import tempfile
    from transformers import CLIPTextConfig, CLIPTextModel
    from tests.fixtures import make_tokenizer
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = make_tokenizer(scratch)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    return text_encoder, tokenizer


def train_unet(latents, embeds, steps, seed, which=None):
    """DDPM ε-loss on SD's schedule; embeds (1+P, 77, 32): row 0 the empty prompt, row 1+p prompt p; which (n,):
    each latent's prompt p (default: all prompt 0, PROMPT). 10% of the rows get the empty prompt."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from tests.fixtures import SD_SCHEDULER
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"})
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = _cosine(optimizer, steps)
    g = torch.Generator().manual_seed(seed)
    which = torch.zeros(len(latents), dtype=torch.long) if which is None else which
    for step, idx in enumerate(_batches(len(latents), 64, steps, g)):
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        cond = (torch.rand(len(idx), generator=g) > 0.1).long() * (1 + which[idx])  # 10% empty: CFG needs ε(x, ∅)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=embeds[cond]).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(), loss.backward(), optimizer.step(), schedule.step()
        _progress("unet", step, steps, loss)
    return unet.eval(), loss.item()


def train_classifier(steps, seed, vae, n=6000, labels=None, independent=False, hardened=False):
    """A ViT on balanced faces (labels female/male) and non-faces (target 0.5/0.5). Half of the faces are seen
    through the VAE (encoded and decoded), so that the classifier reads the decoder's slightly soft pixels as it
    will read the diffusion model's samples. labels: the three-class world's {index: label}, each a hair style
    (THREE_LABELS): faces balanced over them, non-faces toward 1/3 each. independent: the world's second
    classifier, which scores runs and never rewards them: a small ResNet (convolutions, where the first is a ViT)
    on faces and non-faces of other seeds, so it never saw the first one's data. hardened: the reward's ViT trained
    also toward "none" on hard negatives (draw_hard_negative, n/6 of them) and on adversarial faces: every
    ADVERSARIAL_EVERY steps, 32 faces attacked in the VAE's latent (latent_attack, 8 steps) toward the other class
    by the model as it is, so that what fools it now is what it learns to refuse."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification
    torch.manual_seed(seed)
    data_seed = seed + (500 if independent else 100)
    if labels:
        styles = {label.lower(): 1 / len(labels) for label in labels.values()}  # in label-index order
        faces, which = make_styled_faces(n, styles, data_seed)
        face_targets = F.one_hot(which.long(), len(labels)).float()
    else:
        faces, female = make_faces(n, 0.5, data_seed)
        face_targets = F.one_hot((~female).long(), 2).float()
        labels = {0: "female", 1: "male"}
    with torch.no_grad():
        for i in range(0, n // 2, 256):
            x = faces[i:min(i + 256, n // 2)] * 2 - 1
            faces[i:i + len(x)] = ((vae.decode(vae.encode(x).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
    rng = np.random.default_rng(data_seed + 100)
    others = torch.stack([to_tensor(draw_non_face(rng)) for _ in range(n // 3)])
    if hardened:  # the styles beyond short, in turn: long hair, and tall hair in the three-class world
        named = {{"female": "long"}.get(label.lower(), label.lower()) for label in labels.values()}
        hard = [style for style in ("long", "tall") if style in named]
        others = torch.cat([others, torch.stack([draw_hard_negative(rng, hard[i % len(hard)])
                                                 for i in range(n // 6)])])
    images = torch.cat([faces, others])
    targets = torch.cat([face_targets, torch.full((len(others), len(labels)), 1 / len(labels))])
    names = dict(num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()})
    if independent:
        model = ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64],
                                                          depths=[1, 1, 1], layer_type="basic", **names))
    else:
        model = ViTForImageClassification(ViTConfig(image_size=SIZE, patch_size=4, num_channels=3, hidden_size=64,
                                                    num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                                                    **names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = _cosine(optimizer, steps)
    g = torch.Generator().manual_seed(seed)
    for step, idx in enumerate(_batches(len(images), 128, steps, g)):
        x = (images[idx] - 0.5) / 0.5
        flip = torch.rand(len(idx), generator=g) < 0.5  # mirror images: the class does not depend on side
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        target = targets[idx]
        if hardened and step % ADVERSARIAL_EVERY == 0:
            faces_idx = torch.randint(0, n, (32,), generator=g)  # faces, of both classes
            shift = torch.randint(1, len(labels), (32,), generator=g) if len(labels) > 2 else 1  # to a class it is not
            other = (face_targets[faces_idx].argmax(-1) + shift) % len(labels)
            probs_of = lambda images: model(pixel_values=(images - 0.5) / 0.5).logits.softmax(-1)
            model.eval().requires_grad_(False)
            attacked = latent_attack(lambda images: probs_of(images).gather(1, other.view(-1, 1)).expand(-1, 2), vae,
                                     faces[faces_idx], 0, steps=8)
            model.train().requires_grad_(True)
            x = torch.cat([x, (attacked - 0.5) / 0.5])
            target = torch.cat([target, torch.full((32, len(labels)), 1 / len(labels))])
        loss = -(target * model(pixel_values=x).logits.log_softmax(-1)).sum(-1).mean()
        optimizer.zero_grad(), loss.backward(), optimizer.step(), schedule.step()
        _progress("classifier", step, steps, loss)
    return model.eval(), loss.item()


def build(out, female_share=FEMALE_SHARE, seed=0, quick=False, reuse=None, shares=None, three=False):
    """Train every part and save the pipeline in `out` and the classifier in `out/classifier`. With `reuse` (a
    world folder), copy its VAE, text encoder, tokenizer and classifier, which do not depend on the share, and
    train only the UNet: a world at another bias in a third of the time. shares: {prompt: female share} to train
    the UNet on several prompts, an equal part of the faces each (default: {PROMPT: female_share}). three: the
    three-class world, hair styles THREE on PROMPT and a classifier with THREE_LABELS (needs `reuse` for the VAE
    and text encoder)."""
    import shutil
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, ViTImageProcessor
    from tests.fixtures import SD_SCHEDULER
    steps = dict(vae=20, unet=20, classifier=20) if quick else dict(vae=1200, unet=1800, classifier=1000)
    n = 512 if quick else 12000
    shares = shares or {PROMPT: female_share}
    log = {"shares": THREE if three else shares, "seed": seed, "steps": steps, "images": n, "reused": reuse}
    start = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    if three:
        images, which = make_styled_faces(n, THREE, seed)[0], torch.zeros(n, dtype=torch.long)
    else:
        parts = [make_faces(n // len(shares), share, seed + 1000 * p)[0] for p, share in enumerate(shares.values())]
        images, which = torch.cat(parts), torch.arange(len(parts)).repeat_interleave(n // len(shares))
    if reuse:
        vae = AutoencoderKL.from_pretrained(os.path.join(reuse, "vae")).eval()
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(reuse, "text_encoder")).eval()
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(reuse, "tokenizer"))
    else:
        vae, log["vae_loss"] = train_vae(images, steps["vae"], seed)
        text_encoder, tokenizer = text_encoder_and_tokenizer(seed)
    log["vae_seconds"] = time.time() - start
    ids = tokenizer(["", *shares], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = text_encoder(ids)[0]
        latents = torch.cat([vae.encode(images[i:i + 256] * 2 - 1).latent_dist.mode() for i in range(0, len(images), 256)])
        latents = latents * vae.config.scaling_factor
    unet, log["unet_loss"] = train_unet(latents, embeds, steps["unet"], seed, which)
    log["unet_seconds"] = time.time() - start - log["vae_seconds"]
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out)
    if reuse and not three:
        shutil.copytree(os.path.join(reuse, "classifier"), os.path.join(out, "classifier"))
    else:
        classifier, log["classifier_loss"] = train_classifier(steps["classifier"], seed, vae, n=600 if quick else 6000,
                                                              labels=THREE_LABELS if three else None)
        classifier.save_pretrained(os.path.join(out, "classifier"))
        ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                          do_resize=True).save_pretrained(os.path.join(out, "classifier"))
    log["classifier_seconds"] = time.time() - start - log["vae_seconds"] - log["unet_seconds"]
    log["seconds"] = time.time() - start
    with open(os.path.join(out, "build.json"), "w") as f:
        json.dump(log, f, indent=2)
    return log


ADVERSARIAL_EVERY = 4  # hardened: one step in 4 also learns from 32 faces attacked by the model as it is
REFEREE = "tests.referee:Referee"  # --independent-classifier: the worlds' referee (tests/referee.py)
INDEPENDENT = "independent"  # the folder, beside each world's classifier, of its second classifier


def build_independent(out, three=False, seed=0, steps=1000, n=6000, hardened=False):
    """The world's second classifier (train_classifier's `independent`), into `out`: it scores runs and never rewards
    them, so that a run that fools the reward classifier is caught (Shen et al., ICLR 2024). Same labels, same
    preprocessing as the first. hardened: instead, the reward's ViT hardened (train_classifier's `hardened`), for
    tests/toyworld_model/hardened (three: tests/toyworld_three/hardened)."""
    from diffusers import AutoencoderKL
    from transformers import ViTImageProcessor
    start = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    vae = AutoencoderKL.from_pretrained(os.path.join(SHIPPED, "vae")).eval()
    model, loss = train_classifier(steps, seed, vae, n=n, labels=THREE_LABELS if three else None,
                                   independent=not hardened, hardened=hardened)
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      do_resize=True).save_pretrained(out)
    log = {"architecture": "ViT, hardened" if hardened else "ResNet (basic blocks 16/32/64)", "seed": seed,
           "steps": steps, "images": n, "face_seed": seed + (100 if hardened else 500), "loss": loss,
           "seconds": time.time() - start}
    with open(os.path.join(out, "build.json"), "w") as f:
        json.dump(log, f, indent=2)
    return log


# The world's run settings for R_balance, shared by the learning tests and the demo (docs/toy-world.md says
# why). ε and δ are not here: they are derived from the 4x8x8 latent by the same rule as on SD (derived_sizes).
SETTINGS = dict(batch_size=64, num_steps=5, guidance_scale=5.0, updates_per_epoch=4, train_batch_size=16,
                lr=5e-4, mixed_precision="no", device="cpu")
# R_shift has no target to overshoot (q only has to rise), so it takes larger steps: 2 updates at lr 1.5e-3.
SHIFT_SETTINGS = {**SETTINGS, "updates_per_epoch": 2, "train_batch_size": 32, "lr": 1.5e-3}
# The three-class world's rarest class starts at 5-10% of the images, so few images carry its push: lr 1e-3 brought
# every class to within 0.1 of 1/3 in half the epochs of 5e-4, and kept them within 0.2 (docs/classes.md).
THREE_SETTINGS = {**SETTINGS, "lr": 1e-3}


def cli_flags(settings=SETTINGS, world=SHIPPED):
    """The flags of a run of ddpo_debias.py on `world` at `settings` (demo, two, tests/test_learning.py)."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()] + [
        f"--model={world}", f"--classifier={os.path.join(world, 'classifier')}"]


def windows(metrics, size=5):
    """Pool a run's labels over windows of `size` epochs: -> [(first epoch, q, none share)]. One epoch's q over B
    images swings by ±0.5/√B at q = 0.5 (binomial): ±0.12 at B = 16, ±0.06 at B = 64."""
    return [(start, shares and shares["female"], none)
            for start, shares, none in pooled_shares(metrics, ("female", "male"), size)]


THREE_WORLD = os.path.join(HERE, "toyworld_three")  # the three-class world's UNet and classifier (the rest: SHIPPED)
THREE_FLAGS = [f"--unet={os.path.join(THREE_WORLD, 'unet')}", f"--classifier={os.path.join(THREE_WORLD, 'classifier')}",
               "--classes=" + ",".join(THREE)]  # after cli_flags(), whose --classifier they replace


def pooled_shares(metrics, classes, size=2):
    """Each class's share over windows of `size` epochs: -> [(first epoch, {class: share} or None, none share)]."""
    pooled = []
    for start in range(0, len(metrics) - size + 1, size):
        part = metrics[start:start + size]
        counts = {c: sum(m[f"n_{c}"] for m in part) for c in classes}
        n, none = sum(counts.values()), sum(m["n_none"] for m in part)
        pooled.append((start, {c: k / n for c, k in counts.items()} if n else None, none / (n + none)))
    return pooled


def three(out, epochs=16, seed=0, extra=()):
    """Fine-tune the three-class world with --reward balance at THREE_SETTINGS toward 1/3 of each hair style; prints
    the shares pooled over 2-epoch windows (128 images), read by the referee and by the reward's classifier."""
    import ddpo_debias
    code = ddpo_debias.main(cli_flags(THREE_SETTINGS) + THREE_FLAGS + ["--reward=balance", f"--epochs={epochs}", f"--seed={seed}",
                                                         f"--output-dir={out}", f"--independent-classifier={REFEREE}",
                                                         *extra])
    if code == 0:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
        refereed = pooled_shares([m["independent"] for m in metrics], THREE)
        for (start, shares, none), (_, read, read_none) in zip(pooled_shares(metrics, THREE), refereed):
            shown = lambda found: ", ".join(f"{c} {v:.2f}" for c, v in (found or {}).items())
            print(f"epochs {start}-{start + 1}: by the referee {shown(read)}, none {read_none:.0%} (by the reward's "
                  f"classifier {shown(shares)}, none {none:.0%})")
    return code


def demo(out, world=SHIPPED, epochs=16, seed=0, extra=()):
    """Fine-tune the world with --reward balance through the real CLI: the usual run folder in `out`. Every epoch's
    images are also read by the world's referee (tests/referee.py), which no reward uses."""
    import ddpo_debias
    code = ddpo_debias.main(cli_flags(world=world) + ["--reward=balance", f"--epochs={epochs}", f"--seed={seed}",
                                                      f"--output-dir={out}", f"--independent-classifier={REFEREE}",
                                                      *extra])
    if code == 0:  # the female ratio as docs/toy-world.md reports it: pooled over 2-epoch windows (128 images)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
        refereed = windows([m["independent"] for m in metrics], 2)
        for (start, q, none), (_, read, read_none) in zip(windows(metrics, 2), refereed):
            shown = "-" if read is None else f"{read:.2f}"
            print(f"epochs {start}-{start + 1}: female ratio by the referee {shown}, none {read_none:.0%} "
                  f"(by the reward's classifier {q:.2f}, none {none:.0%})")
    return code


TWO_UNET = os.path.join(HERE, "toyworld_two_unet")  # the two-prompt world's UNet (the rest: the shipped world's)


class PooledHistory:
    """The control for the two-prompt world: the paper's q over the whole batch, as if every image had one prompt.
    Rewards and their statistics come from one pooled window; the metrics' per-prompt rows from a second history
    that sees the real prompts but scores nothing (its rewards are thrown away)."""

    base = None  # rewards.PromptHistory, kept here while two() puts this class in its place

    def __init__(self, prompts, size, underrepresented=None, announce=True, target=None, threshold=0.7):
        self.pooled = self.base(prompts, size, underrepresented, announce, target, threshold)
        self.shadow = self.base(prompts, size, underrepresented, announce=False, target=target, threshold=threshold)
        self.prompts, self.size, self.windows = self.shadow.prompts, size, self.pooled.windows
        self.target = self.shadow.target
        self.underrepresented = self.shadow.underrepresented

    def score(self, name, probs, prompt_ids, ranks=None):
        _, labels, rows = self.shadow.score(name, probs, prompt_ids, ranks)
        values, _, _ = self.pooled.score(name, probs, [0] * len(prompt_ids), ranks)
        return values, labels, rows  # compute_advantages: prompt 0's pooled window (= the batch), the batch's for prompt 1

    def state_dict(self):
        return {"prompts": self.prompts, "pooled": self.pooled.state_dict(), "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state):
        self.pooled.load_state_dict(state["pooled"]), self.shadow.load_state_dict(state["shadow"])
        self.windows, self.underrepresented = self.pooled.windows, self.shadow.underrepresented


def two(out, scope="prompt", epochs=12, seed=0, unet=TWO_UNET):
    """Fine-tune the two-prompt world on both prompts at once with --reward balance at SETTINGS (32 images of each
    prompt an epoch): q per prompt (scope "prompt", this project) or over the batch (scope "batch", the paper's q,
    PooledHistory). Prints each prompt's female ratio pooled over 4-epoch windows (128 images of each prompt)."""
    import ddpo_debias
    import rewards
    with open(out + ".prompts.txt", "w") as f:
        f.write("\n".join(TWO_PROMPTS) + "\n")
    original = PooledHistory.base = rewards.PromptHistory
    rewards.PromptHistory = PooledHistory if scope == "batch" else original
    try:
        code = ddpo_debias.main(cli_flags() + [f"--unet={unet}", f"--prompts={out}.prompts.txt", "--reward=balance",
                                               f"--epochs={epochs}", f"--seed={seed}", f"--output-dir={out}"])
    finally:
        rewards.PromptHistory = original
    if code == 0:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
        for prompt in TWO_PROMPTS:
            rows = [dict(r, epoch=m["epoch"]) for m in metrics for r in m["per_prompt"] if r["prompt"] == prompt]
            print(prompt, " ".join(f"{q:.2f}" if q is not None else "-" for _, q, _ in windows(rows, 4)))
    return code


def one_thread():
    """The world's runs (demo, two, three) use one torch thread unless OMP_NUM_THREADS says otherwise. A UNet this
    small keeps one core busy: a second thread gains little on an idle machine and loses far more on a busy one,
    and a run's numbers depend on the thread count (in the 6th digit), so one thread also keeps them the same on
    every machine and under any load: the records in docs/ are at one thread (docs/speed-and-memory.md)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the world from scratch (about 15 minutes on 2 cores)")
    b.add_argument("out")
    b.add_argument("--female-share", type=float, default=FEMALE_SHARE)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quick", action="store_true", help="a few steps of each stage: checks that the build runs")
    b.add_argument("--reuse", help="a world folder whose VAE, text encoder and classifier to keep: trains the UNet only")
    b.add_argument("--two-prompts", action="store_true", help="train the UNet on TWO_PROMPTS, skewed in opposite "
                   "directions (the multi-prompt world of docs/many-prompts.md)")
    b.add_argument("--three-classes", action="store_true", help="train the UNet on THREE hair styles (70/20/10) and "
                   "a three-label classifier (the K-class world of docs/classes.md); needs --reuse")
    d = sub.add_parser("demo", help="fine-tune the shipped world with --reward balance (35 s at one thread, "
                       "on the 2-core development machine)")
    d.add_argument("out", help="the run folder (new)")
    d.add_argument("--world", default=SHIPPED, help="a world folder (default: the shipped one)")
    d.add_argument("--epochs", type=int, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--purify", help="the reward reads each image as the base model redraws it from this step "
                   "(ddpo_debias.py --purify, e.g. 300; docs/toy-world.md)")
    t = sub.add_parser("two", help="fine-tune the two-prompt world on both prompts (12 epochs: 35 s at one "
                       "thread)")
    t.add_argument("out", help="the run folder (new)")
    t.add_argument("--scope", choices=("prompt", "batch"), default="prompt",
                   help="q per prompt (this project) or over the whole batch (the paper's q, the control)")
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--seed", type=int, default=0)
    k = sub.add_parser("three", help="fine-tune the three-class world toward 1/3 of each hair style (46 s at one "
                       "thread)")
    k.add_argument("out", help="the run folder (new)")
    k.add_argument("--epochs", type=int, default=16)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--lr", help="another learning rate than THREE_SETTINGS' (0: the control)")
    k.add_argument("--classifier", help="another reward classifier than the world's (e.g. tests/toyworld_three/hardened)")
    k.add_argument("--purify", help="the reward reads each image as the base model redraws it from this step")
    i = sub.add_parser("independent", help="train a world's second classifier, which scores and never rewards "
                       "(about 3 minutes on 2 cores)")
    i.add_argument("out", help="e.g. tests/toyworld_model/independent")
    i.add_argument("--three-classes", action="store_true", help="the three-class world's (labels THREE_LABELS)")
    i.add_argument("--quick", action="store_true", help="a few steps: checks that it trains and saves")
    i.add_argument("--hardened", action="store_true", help="instead, the reward's ViT hardened: hard negatives and "
                   "latent attacks toward none (tests/toyworld_model/hardened, or with --three-classes "
                   "tests/toyworld_three/hardened; about 36 minutes on 2 cores)")
    args = parser.parse_args(argv)
    if args.command == "independent":
        quick = dict(steps=20, n=300) if args.quick else {}
        print(json.dumps(build_independent(args.out, args.three_classes, hardened=args.hardened, **quick), indent=2))
        return 0
    if args.command != "build":
        one_thread()
    given = lambda *names: [f"--{name}={getattr(args, name)}" for name in names if getattr(args, name)]  # to the CLI
    if args.command == "three":
        return three(args.out, args.epochs, args.seed, given("lr", "classifier", "purify"))
    if args.command == "two":
        return two(args.out, args.scope, args.epochs, args.seed)
    if args.command == "demo":
        return demo(args.out, args.world, args.epochs, args.seed, given("purify"))
    print(json.dumps(build(args.out, args.female_share, args.seed, args.quick, args.reuse,
                           TWO_PROMPTS if args.two_prompts else None, args.three_classes), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
