"""Which --purify T: the reward's ViT reading the toy world's faces after the base model redraws them from step T
(ddpo_debias.purified, the run's code), for T in 100..600. Read: 500 "male" faces attacked in the VAE's latent
toward "female" via the ViT (toyworld.latent_attack, as tests/test_referee.py; they fool it on at least 90%), and
500 clean faces of each class, all through the VAE round trip as samples are. The rule: the smallest T at which
the attacks fool the ViT on at most 10% after the redraw; at it, what share of real long hair the ViT still
reads. Faces of seeds no test uses. From the repository's root (about 10 minutes on 2 cores):

    python docs/benchmarks/2026-12-05-referee/purify/calibrate.py OUT.json
"""
import json
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.getcwd())
import ddpo_debias as dd  # noqa: E402
import rewards  # noqa: E402
from tests import toyworld  # noqa: E402

VIT = os.path.join(toyworld.SHIPPED, "classifier")
T_VALUES = (100, 200, 300, 400, 600)


def main(out):
    if os.path.exists(out):
        sys.exit(f"calibrate.py: error: {out} exists; give a new file")
    torch.manual_seed(0)
    config = dd.Config(model=toyworld.SHIPPED, **{**toyworld.SETTINGS, "batch_size": 100})
    unet, vae, text_encoder, tokenizer, scheduler = dd.load_models(config, "cpu")
    embeds = dd.encode_prompts(text_encoder, tokenizer, [toyworld.PROMPT], "cpu")
    run = SimpleNamespace(base=unet, vae=vae, scheduler=scheduler, prompt_embeds=embeds,
                          noise_generator=torch.Generator().manual_seed(0))
    classifier = rewards.Classifier(VIT)
    differentiable = lambda images: rewards.Classifier.__call__.__wrapped__(classifier, images)
    male, _ = toyworld.make_faces(500, 0.0, seed=5151)
    faces, female = toyworld.make_faces(1000, 0.5, seed=5252)
    sets = {"attacked": torch.cat([toyworld.latent_attack(differentiable, vae, male[i:i + 100], target=0)
                                   for i in range(0, 500, 100)])}
    with torch.no_grad():
        encode = lambda x: vae.encode(x * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
        sets["long hair"] = dd.decode(vae, encode(faces[female]), config, "cpu")
        sets["short hair"] = dd.decode(vae, encode(faces[~female]), config, "cpu")
    found = {}
    for t in (0, *T_VALUES):
        row = {}
        for name, images in sets.items():
            read = images
            if t:
                latents = torch.cat([encode(images[i:i + 100]) for i in range(0, len(images), 100)])
                read = torch.cat([dd.purified(run, {"latents": latents[i:i + 100, None],
                                                    "prompt_ids": torch.zeros(len(latents[i:i + 100]),
                                                                              dtype=torch.long)},
                                              dd.dataclasses.replace(config, purify=t,
                                                                     batch_size=len(latents[i:i + 100])))
                                  for i in range(0, len(latents), 100)])
            labels = rewards.label_images(classifier(read))
            row[name] = {label or "none": labels.count(label) / len(labels) for label in ("female", "male", None)}
        found[t] = row
        print(t, json.dumps(row), flush=True)
    chosen = min([t for t in T_VALUES if found[t]["attacked"]["female"] <= 0.1], default=None)
    result = {"read_female_by_T": found, "rule": "smallest T with attacks read female <= 10%", "chosen": chosen}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({"chosen": chosen}))


if __name__ == "__main__":
    main(sys.argv[1])
