"""Tiny local models for the tests, saved with `save_pretrained` so the real loading code runs offline.

    make_tokenizer(path)            a CLIPTokenizer from a byte-level vocab.json and a one-line merges.txt
    make_tiny_sd(path)              a StableDiffusionPipeline folder: UNet 32/64 channels, CLIP hidden 32
    make_tiny_sdxl(path)            a StableDiffusionXLPipeline folder: two text encoders, added conditions, and
                                    SDXL's own scheduler file (Euler), as the hub's SDXL base has them
    make_tiny_sd3(path)             a StableDiffusion3Pipeline folder: SD3Transformer2DModel, 16-channel VAE with
                                    SD 3's shift, two CLIPs with projections and a T5 encoder (t5=False: none)
    make_tiny_classifier(path)      a ViT image classifier with the labels given (female/male by default)
"""
import json
import os
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, ViTConfig, ViTForImageClassification
from transformers import ViTImageProcessor

# The scheduler of Stable Diffusion v1.5 (its scheduler_config.json, as DDIM).
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def _bytes_to_unicode():
    """GPT-2/CLIP's reversible map from the 256 bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_tokenizer(path, model_max_length=77):
    os.makedirs(path, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["th", "<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\nt h\n")
    tokenizer = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                              model_max_length=model_max_length)
    return tokenizer


def make_tiny_sd(path, seed=0, sample_size=8):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=unet.config.in_channels,
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=16, scaling_factor=0.18215)
    with tempfile.TemporaryDirectory() as vocab:  # the vocabulary files; save_pretrained writes its own copy
        tokenizer = make_tokenizer(vocab)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


# SDXL base's scheduler_config.json: an Euler scheduler, which load_models turns into a DDIM as for SD 1.5.
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                  "trained_betas": None, "use_karras_sigmas": False}


def make_tiny_sdxl(path, seed=0, sample_size=8):
    """SDXL's architecture in small (as diffusers' own SDXL tests build it): the UNet's cross-attention reads both
    encoders' states side by side (32 + 32), and its added "text_time" embedding the second encoder's pooled
    projection (32) with the six size ids (8 each): 6·8 + 32 = 80 inputs."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=16, scaling_factor=0.13025, force_upcast=True)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = make_tokenizer(vocab)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
                vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer, unet=unet,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text, hidden_act="gelu")), tokenizer_2=tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULER))
    pipe.save_pretrained(path)
    with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SDXL_SCHEDULER, f)
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({**index, "scheduler": ["diffusers", "EulerDiscreteScheduler"]}, f, indent=2)
    return path


# SD 3.5's scheduler_config.json (stabilityai/stable-diffusion-3.5-medium): the flow's shift 3, no dynamic shifting.
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


def make_tiny_sd3(path, seed=0, sample_size=8, t5=True):
    """SD 3's architecture in small, as diffusers' own SD 3 tests build it: the transformer's joint attention reads
    the text states (CLIPs' 32 + 32 padded or cut to T5's width 32, then T5's tokens) and the pooled projections
    (32 + 32 = 64); the VAE has 16 latent channels and SD 3's scaling and shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=1, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=16)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = make_tokenizer(vocab)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
                vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                        num_heads=4, pad_token_id=tokenizer.pad_token_id)) if t5 else None
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=vae,
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**text)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)), tokenizer_2=tokenizer,
        text_encoder_3=encoder_3, tokenizer_3=tokenizer if t5 else None)
    pipe.save_pretrained(path)
    return path


def make_tiny_classifier(path, labels=("female", "male"), seed=0, image_size=32):
    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=4, intermediate_size=37, num_labels=len(labels),
                       id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():  # calibrate the head on smooth random images: confident on some, unsure on others
        images = torch.nn.functional.interpolate(torch.rand(256, 3, 4, 4), size=image_size, mode="bilinear")
        logits = model(pixel_values=(images - 0.5) / 0.5).logits
        spread = (logits[:, 0] - logits[:, 1]).std()
        model.classifier.weight.mul_(3.0 / spread)
        model.classifier.bias.sub_(model(pixel_values=(images - 0.5) / 0.5).logits.mean(dim=0))
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(path)
    return path


def make_tiny_clip(path, seed=0, image_size=32):
    """A CLIP (image and text towers, projections of 16) for --clip-model: random, with a CLIP tokenizer and image
    processor, so that QualityModel loads it as it loads openai/clip-vit-large-patch14."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = make_tokenizer(vocab)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  image_size=image_size, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28]).save_pretrained(path)
    return path


def two_classes(p_female) -> torch.Tensor:
    """P(female) (B,) as the classifier's (B, 2) P(class) over (female, male), for tests written in P(female)."""
    p = torch.as_tensor(p_female, dtype=torch.float32)
    return torch.stack([p, 1 - p], dim=-1)
