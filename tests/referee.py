"""The toy worlds' referee: which hair style explains an image best, read by fitting the world's own renderer.

    python -m tests.referee FOLDER_OR_UNET [--images 512] [--seed 0] [--three-classes] [--out FILE.json]

A reward's classifier can be fooled: a run at R_balance learnt to add faint pale halos that its ViT reads as long
hair (docs/benchmarks.md). The referee reads what the world means instead, by analysis by synthesis. draw_face
paints a face from a handful of numbers (position, head size, cap depth, hair length, four colours), so:
  1. where is the face? A grid of geometries (GRID: the head's centre and size, its width, the cap's depth, the
     hair's length or height) is painted as region maps (background, clothes, cap, skin, eyes, mouth, and a zone
     where each style's hair would be), blurred as the VAE blurs, with a one-pixel ring round the figure for the
     VAE's colour bleed. Least squares gives each region's colour; the geometry with the least squared error is
     the best fit. For the images that fit leaves unlabelled (step 3), a search moves each of draw_face's numbers
     in turn (STEPS) from there while the fit improves: the grid is coarse, and a face placed a pixel off reads
     its hair wrong;
  2. paint each answer: the fit is painted by the world's own painter (toyworld.paint_face) in its fitted colours,
     once short and once with each style's hair in the cap's colour, and sent through the world's VAE, as every
     sample was; each painting's colours are then corrected through the VAE (COLOUR_ROUNDS), which shifts colours
     as well as blurring them;
  3. where does the image lie between them? t = <x - short, style - short> / |style - short|^2 (0: the short
     painting, 1: the style's), and P(style) = softmax over (CUT for short, t per style) / SOFTNESS: t >= 0.5
     reads that style, t <= 0.45 short. The cap and the hair share one colour, so a halo that is not the cap's
     colour explains nothing; where the VAE leaves two paintings alike (LEGIBLE), t says nothing either way.
     A label also needs its style's painting within FIT_RMS of the image: an attack's strokes, noise, blobs,
     shuffled pieces, a face that fell apart fit no painting that well, and read "none".
The referee has no weights: nothing was trained, nothing the reward uses is read. It is a reader for the toy worlds
only (it knows how they are drawn); on SD, see docs/evaluate.md.

As an independent reader of a run: `ddpo_debias.py ... --independent-classifier tests.referee:Referee` (the
metrics' "independent" block; tests.toyworld demo does this). tests/test_referee.py checks it: accuracy through
the VAE, non-faces, attacks that fool the reward's classifiers, and how often its errors coincide with theirs.
"""
import argparse
import itertools
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests.` from any folder
import rewards  # noqa: E402
from tests import toyworld  # noqa: E402

STYLES = {"female": "long", "male": "short", "long": "long", "short": "short", "tall": "tall"}  # class -> hair style
# The regions fitted: each part's index in the region maps. The long and the tall hair are zones with colours of
# their own in the fit, so that what lies there (hair, a halo, background) never pulls the head's place or the
# cap's colour; the eyes and the mouth are regions of their own, so that the search below can place them.
REGIONS = {"background": 0, "clothes": 1, "cap": 2, "neck": 3, "head": 3, "long hair": 4, "tall hair": 5, "eyes": 6,
           "mouth": 7}
S = 4 * toyworld.SIZE  # draw_face paints at 4x
# The geometries fitted: draw_face's ranges (face_geometry), each cut into a few values, at 4x pixels.
GRID = dict(dx=np.linspace(-9, 9, 5), dy=np.linspace(-8, 8, 9), r=np.linspace(0.205, 0.255, 6) * S,
            width=(0.81, 0.87), top=(0.3, 0.4), length=(1.54, 1.71), height=(1.68, 1.82))
# The search from the grid's best fit, for the images the grid's fit leaves unlabelled: each of draw_face's numbers
# moved by ± its step (4x pixels; top: a share of r), at these scales of the step, while the fit improves.
STEPS = dict(cx=2.0, cy=2.0, r=1.5, w=1.2, top=0.04, eye_y=1.0, eye_dx=1.0, mouth_y=1.0, mouth_w=1.0, length=3.0,
             height=3.0)
SCALES, ROUNDS = (1, 0.5, 0.25), 2
BLUR = 0.7  # the VAE's blur, as a Gaussian's std in pixels
COLOUR_ROUNDS = 2  # each painting's colours corrected through the VAE this many times (Referee.seen)
# draw_face's hair and skin: a palette entry and its jitter per channel. The fitted hair (the cap's colour) and skin
# are moved into them, so the paintings compared are faces the world can draw.
PALETTES = {"hair": (toyworld.HAIR, 15), "skin": (toyworld.SKIN, 12)}
PALETTE_SLACK = 10  # per channel, for the colours' blur at the figure's edges
# The reading's four numbers, chosen on faces and attacks of seeds no test reads: the highest accuracy on the worse
# class among the settings whose attacks read "female" stay at most 10% with 95% confidence
# (docs/benchmarks/2026-12-05-referee/colours/choose.py).
CUT = 0.475  # t: how much of the full hair of that style, in the cap's colour, the image holds; above CUT: that style
SOFTNESS = 0.0295  # P(style) = softmax over (CUT for short, t per style) / SOFTNESS: t <= 0.45 or >= 0.5: P >= 0.7
LEGIBLE = 0.01  # the squared distance below which a style's painting and the short one look alike through the VAE
FIT_RMS = 0.035  # rms per value: a label needs its style's painting this close to the image


def geometries(styles):
    """draw_face's geometries on GRID with a zone for each style in `styles` beyond short (the eyes and mouth at
    their mean places)."""
    lengths = GRID["length"] if "long" in styles else (None,)
    heights = GRID["height"] if "tall" in styles else (None,)
    for dx, dy, r, width, top, length, height in itertools.product(
            GRID["dx"], GRID["dy"], GRID["r"], GRID["width"], GRID["top"], lengths, heights):
        w, cy = r * width, S * 0.45 + dy
        yield dict(cx=S / 2 + dx, cy=cy, r=r, w=w, top=top, eye_y=cy - 0.075 * r, eye_dx=0.39 * w,
                   mouth_y=cy + 0.475 * r, mouth_w=0.4 * w, length=length and length * r, height=height and height * r)


def region_maps(g, styles):
    """-> (R, 32, 32): the share of each pixel in each region (REGIONS) of face g with every zone in `styles`; the
    zones of styles not in `styles` are left out (R = 6 + their number)."""
    image = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(image)
    for style in [s for s in ("long", "tall") if s in styles] or ["short"]:  # each zone painted where it lies
        toyworld.paint_face(draw, {**g, "style": style}, lambda part: REGIONS[part])
    # each 4x4 block's count of each region's pixels: the region maps at 32x32, as draw_face's downsampling sees them
    labels = np.asarray(image).astype(np.int64).reshape(32, 4, 32, 4).transpose(0, 2, 1, 3).reshape(1024, 16)
    counts = np.bincount((np.arange(1024)[:, None] * 8 + labels).ravel(), minlength=1024 * 8).reshape(32, 32, 8)
    kept = [0, 1, 2, 3] + [REGIONS[f"{s} hair"] for s in ("long", "tall") if s in styles] + [6, 7]
    return torch.from_numpy(counts[:, :, kept] / 16).permute(2, 0, 1).float()


def blur(maps):
    """(..., 32, 32) maps blurred by BLUR, as the VAE blurs: a separable Gaussian, edges replicated."""
    kernel = torch.exp(-torch.arange(-2, 3.0) ** 2 / (2 * BLUR ** 2))
    kernel = kernel / kernel.sum()
    flat = F.pad(maps.reshape(-1, 1, 32, 32), (2, 2, 2, 2), mode="replicate")
    return F.conv2d(F.conv2d(flat, kernel.view(1, 1, 1, 5)), kernel.view(1, 1, 5, 1)).view(maps.shape)


def fitting_basis(maps):
    """(G, R, 32, 32) region maps -> (G, 1024, R + 1) orthonormal bases of what least squares can paint: each region
    blurred by BLUR, and a ring one pixel wide round the figure, taken from the background, for the VAE's bleed."""
    figure = 1 - maps[:, :1]
    ring = (F.max_pool2d(figure, 3, 1, 1) - figure).clamp(min=0)
    maps = torch.cat([maps[:, :1] - ring, maps[:, 1:], ring], dim=1)  # (G, R + 1, 32, 32)
    basis, _ = torch.linalg.qr(blur(maps).flatten(2).transpose(1, 2))
    return basis


def best_fit(basis, images, chunk=200):
    """images (N, 3, 32, 32) -> the index of the geometry whose basis leaves the least squared error, (N,)."""
    x = images.reshape(len(images), 3, 1024).transpose(1, 2)  # (N, 1024, 3)
    best, arg = torch.full((len(images),), float("inf")), torch.zeros(len(images), dtype=torch.long)
    for i in range(0, len(basis), chunk):
        explained = torch.einsum("gpk,npc->ngkc", basis[i:i + chunk], x).pow(2).sum((2, 3))  # (N, g)
        value, index = explained.neg().min(1)  # the least error is the most explained
        better = value < best
        best, arg = torch.where(better, value, best), torch.where(better, index + i, arg)
    return arg


def refined(g, maps, image, styles):
    """Face g (its region maps: `maps`) moved, one of draw_face's numbers at a time (STEPS, at each of SCALES),
    while the least-squares fit to `image` (3, 32, 32) improves: the grid's best fit, made as fine as the painter.
    -> (g, its region maps)."""
    steps = {k: v for k, v in STEPS.items() if g.get(k) is not None}  # length/height: only where the zone is fitted
    x = image.reshape(3, 1024).T  # (1024, 3)
    error = lambda maps: x.pow(2).sum() - torch.einsum("gpk,pc->gkc", fitting_basis(maps), x).pow(2).sum((1, 2))
    maps = maps[None]
    best = error(maps)[0]
    for scale in SCALES:
        for _ in range(ROUNDS):
            moves = [{**g, k: g[k] + sign * scale * step} for k, step in steps.items() for sign in (-1, 1)]
            moved = torch.stack([region_maps(m, styles) for m in moves])  # (2 * numbers, R, 32, 32)
            errors = error(moved)
            i = int(errors.argmin())
            if errors[i] >= best:
                break
            g, maps, best = moves[i], moved[i:i + 1], errors[i]
    return g, maps[0]


def in_palette(colour, palette, slack=PALETTE_SLACK):
    """The colour moved into the nearest palette entry's box (the entry ± its jitter ± slack, per channel)."""
    centre = min(palette[0], key=lambda c: sum((a - b) ** 2 for a, b in zip(c, colour)))
    reach = palette[1] + slack
    return tuple(int(min(max(v, c - reach), c + reach)) for v, c in zip(colour, centre))


def colours_of(maps, image):
    """The colours (4, 3) in [0, 1] of the background, the clothes, the hair (the cap's) and the skin that least
    squares fits to `image` (3, 32, 32) over a face's region maps (R, 32, 32)."""
    return torch.linalg.lstsq(maps.flatten(1).T, image.reshape(3, 1024).T).solution[:4].clamp(0, 1)


def colour_maps(maps, style, styles):
    """(R, 32, 32) region maps -> (4, 32, 32): where the face painted in `style` shows each colour of colours_of
    (the zones of the other styles taken as background, though clothes may lie under them: only the correction's
    direction needs it; the eyes and the mouth left out: they have colours of their own)."""
    zones = {s: 4 + i for i, s in enumerate(s for s in ("long", "tall") if s in styles)}
    hair = maps[2] + sum(maps[i] for s, i in zones.items() if s == style)
    background = maps[0] + sum(maps[i] for s, i in zones.items() if s != style)
    return torch.stack([background, maps[1], hair, maps[3]])


def painting(g, colours, style):
    """Face g painted in `style` by draw_face's painter in `colours` (4, 3) in [0, 1] (as colours_of's; the hair and
    the skin moved into draw_face's palettes, so that what is compared is a face the world can draw). -> (3, 32, 32)"""
    background, clothes, hair, skin = [tuple(int(v) for v in c.round()) for c in colours * 255]
    fill = {"background": background, "clothes": clothes, "hair": in_palette(hair, PALETTES["hair"]),
            "skin": in_palette(skin, PALETTES["skin"])}
    canvas = Image.new("RGB", (S, S), fill["background"])
    toyworld.paint_face(ImageDraw.Draw(canvas), {**g, "style": style}, lambda part: toyworld.PART_COLOURS.get(
        part) or fill[toyworld.COLOUR_OF.get(part, part)])
    return toyworld.to_tensor(canvas.resize((toyworld.SIZE, toyworld.SIZE), Image.LANCZOS))


class Referee:
    """images (B, 3, 32, 32) in [0, 1] -> P(class) (B, K), as rewards.Classifier: the classes "female"/"male"
    (long/short hair) or "short"/"long"/"tall" (the three-class world), in the order given."""

    def __init__(self, classes=("female", "male"), device="cpu", world=toyworld.SHIPPED):
        from diffusers import AutoencoderKL
        unknown = [c for c in classes if c.lower() not in STYLES]
        if unknown:
            raise ValueError(f"the referee reads the toy worlds' classes ({', '.join(STYLES)}), not {unknown}")
        self.classes = [STYLES[c.lower()] for c in classes]
        self.styles = ["short"] + [s for s in ("long", "tall") if s in self.classes]  # the paintings, short first
        self.vae = AutoencoderKL.from_pretrained(os.path.join(world, "vae"), low_cpu_mem_usage=False).eval()
        self.vae.requires_grad_(False)
        self.shapes = list(geometries(self.styles))
        self.maps = torch.stack([region_maps(g, self.styles) for g in self.shapes])
        self.basis = fitting_basis(self.maps)

    def through_vae(self, images, chunk=256):
        """The VAE's round trip, as every sample was made: encode (its mode), decode."""
        with torch.no_grad():
            return torch.cat([((self.vae.decode(self.vae.encode(images[i:i + chunk] * 2 - 1).latent_dist.mode()).sample
                                + 1) / 2).clamp(0, 1) for i in range(0, len(images), chunk)])

    def seen(self, fits, images, legible=LEGIBLE):
        """fits: a (g, maps) per image -> t (B, styles), the rms distance to each style's painting (B, styles) and
        reach (B, styles - 1): t is the image's place on the line from the short painting (0) to each style's (1)
        through the VAE (t of short: CUT; CUT too where reach, the squared distance from the short painting, is under
        `legible`). Each style's painting starts in the colours least squares fits, and its colours are corrected
        COLOUR_ROUNDS times through the VAE, which shifts colours as well as blurring them: a step of Gauss-Newton
        with the VAE taken as the blur, colours += lstsq(blurred colour maps, image - its painting seen)."""
        colours = torch.stack([colours_of(maps, image) for (_, maps), image in zip(fits, images)])  # (B, 4, 3)
        colours = colours[:, None].repeat(1, len(self.styles), 1, 1)  # (B, styles, 4, 3): one set per painting
        where = blur(torch.stack([torch.stack([colour_maps(maps, style, self.styles) for style in self.styles])
                                  for _, maps in fits]))  # (B, styles, 4, 32, 32)
        for step in range(COLOUR_ROUNDS + 1):
            painted = torch.stack([torch.stack([painting(g, c, style) for c, style in zip(colours[b], self.styles)])
                                   for b, (g, _) in enumerate(fits)])  # (B, styles, 3, 32, 32)
            seen = self.through_vae(painted.flatten(0, 1)).view(painted.shape)
            if step < COLOUR_ROUNDS:
                miss = (images[:, None] - seen).flatten(3).transpose(2, 3)  # (B, styles, 1024, 3)
                colours = (colours + torch.linalg.lstsq(where.flatten(3).transpose(2, 3), miss).solution).clamp(0, 1)
        seen = seen.flatten(2)  # (B, styles, 3072)
        short, image = seen[:, :1], images.flatten(1)[:, None]
        along = seen[:, 1:] - short  # (B, styles - 1, 3072): what each style's hair changes in the image
        reach = along.pow(2).sum(-1)
        t = ((image - short) * along).sum(-1) / reach.clamp(min=1e-6)
        t = torch.where(reach < legible, torch.full_like(t, CUT), t)  # alike through the VAE: no evidence either way
        rms = (seen - image).pow(2).mean(-1).sqrt()
        return torch.cat([torch.full((len(images), 1), CUT), t], dim=1), rms, reach

    def read(self, images):
        """(B, 3, 32, 32) -> t and rms (B, styles), as `seen`: from the grid's best fit, and for the images that fit
        leaves unlabelled, from the search's (`refined`)."""
        images = images.detach().float().cpu().clamp(0, 1)
        fits = [(self.shapes[a], self.maps[a]) for a in best_fit(self.basis, images).tolist()]
        t, rms, _ = self.seen(fits, images)
        unsure = (self.decide(t, rms).max(dim=1).values <= rewards.THRESHOLD).nonzero().flatten().tolist()
        if unsure:
            t[unsure], rms[unsure], _ = self.seen([refined(*fits[i], images[i], self.styles) for i in unsure],
                                                  images[unsure])
        return t, rms

    def decide(self, t, rms):
        """P(style) (B, styles): softmax(t / SOFTNESS); "none" (uniform) where the likeliest style's painting is
        further than FIT_RMS from the image: no face of that style explains it (noise, blobs, an attack's strokes)."""
        probs = (t / SOFTNESS).softmax(dim=1)
        far = rms.gather(1, probs.argmax(dim=1, keepdim=True))[:, 0] > FIT_RMS
        probs[far] = 1 / len(self.styles)
        return probs

    def __call__(self, images):
        probs = self.decide(*self.read(images))  # (B, styles)
        return probs[:, [self.styles.index(c) for c in self.classes]].to(images.device)


def sample_and_read(unet, images=512, seed=0, three=False, steps=toyworld.SETTINGS["num_steps"]):
    """A UNet's (folder, or a run folder's unet/) `images` fresh samples of the world's prompt at the world's
    settings, read by the referee: -> {class: share, "none": share, "background": mean colour (3,)}."""
    import ddpo_debias as dd
    import rewards
    classes = list(toyworld.THREE) if three else ["female", "male"]
    config = dd.Config(model=toyworld.SHIPPED, unet=unet, batch_size=images, num_steps=steps,
                       guidance_scale=toyworld.SETTINGS["guidance_scale"], mixed_precision="no", device="cpu")
    model, vae, text_encoder, tokenizer, scheduler = dd.load_models(config, "cpu")
    embeds = dd.encode_prompts(text_encoder, tokenizer, [toyworld.PROMPT], "cpu")
    found = []
    for start in range(0, images, 128):
        n = min(128, images - start)
        found.append(dd.sample(model, vae, scheduler, embeds, torch.zeros(n, dtype=torch.long),
                               dd.Config(**{**config.__dict__, "batch_size": n}), "cpu",
                               torch.Generator().manual_seed(seed * 1000 + start))["images"])
    pictures = torch.cat(found)
    labels = rewards.label_images(Referee(classes)(pictures), classes)
    shares = {c: labels.count(c) / len(labels) for c in classes}
    return {**shares, "none": labels.count(None) / len(labels), "background": background(pictures).mean(0).tolist()}


def background(images):
    """Each image's background colour: the mean of its two top corners' 3x3 pixels, where no face reaches. (B, 3)"""
    return torch.cat([images[:, :, :3, :3], images[:, :, :3, -3:]], dim=-1).mean((2, 3))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("unet", help="a UNet folder, or a run folder with unet/ in it")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--three-classes", action="store_true", help="the three-class world's classes")
    parser.add_argument("--out", help="also write the reading here (JSON)")
    args = parser.parse_args(argv)
    unet = os.path.join(args.unet, "unet") if os.path.isdir(os.path.join(args.unet, "unet")) else args.unet
    if not os.path.isfile(os.path.join(unet, "config.json")):
        parser.error(f"unet: {args.unet} holds no UNet (no config.json, nor unet/config.json)")
    if args.images < 1:
        parser.error(f"--images: at least 1, got {args.images}")
    if args.out and os.path.exists(args.out):
        parser.error(f"--out: {args.out} exists; give a new file")
    toyworld.one_thread()
    reading = sample_and_read(unet, args.images, args.seed, args.three_classes)
    print(json.dumps(reading))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(reading, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
