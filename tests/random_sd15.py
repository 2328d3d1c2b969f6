"""Write a pipeline folder with Stable Diffusion v1.5's architecture and random weights, for benchmarks.

    python -m tests.random_sd15 OUT_DIR          SD 1.5 shapes (UNet 860M, CLIP ViT-L/14 text, SD VAE) and a
                                                 ViT-base classifier in OUT_DIR/classifier: the real FLOPs and
                                                 memory of `ddpo_debias.py`, without the 4 GB download
    python -m tests.random_sd15 OUT_DIR --tiny   the tests' tiny models instead, for a CPU smoke run
    python -m tests.random_sd15 OUT_DIR --sdxl   SDXL base's shapes (UNet 2.6B, two text encoders, 1024 px)
    python -m tests.random_sd15 OUT_DIR --tiny --sdxl   a tiny SDXL pipeline (tests.fixtures.make_tiny_sdxl)
    python -m tests.random_sd15 OUT_DIR --sd35   SD 3.5 medium's shapes (transformer 2.5B, two CLIPs, no T5:
                                                 zeros in its place, as its pipeline does; 1024 px)
    python -m tests.random_sd15 OUT_DIR --tiny --sd35   a tiny SD 3 pipeline (tests.fixtures.make_tiny_sd3)
    (or python path/to/tests/random_sd15.py ... from any folder)

Then: python ddpo_debias.py --model OUT_DIR --classifier OUT_DIR/classifier ...
The images are noise, so the rewards mean nothing: use it for speed and memory only.
"""
import argparse
import logging
import os
import sys
import tempfile

import torch


class NoTorchvisionNotice(logging.Filter):
    """Drop transformers' "`ViTImageProcessor` requires torchvision; falling back to ...Pil" notices (one per
    processor class that diffusers and this script import): the PIL processors they fall back to are the ones meant."""

    def filter(self, record):
        return "requires torchvision" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(NoTorchvisionNotice())  # before transformers loads

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests.` from any folder


def sd21_models(tokenizer_vocab_size=49408):
    """SD 2.1's UNet (768 px: 96x96 latents, linear projections, head dims 5-20), VAE and OpenCLIP-H text encoder, and
    the same classifier, random: for counting memory (tests/count_memory.py --family sd21)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    _, vae, _, classifier = sd15_models(tokenizer_vocab_size)
    unet = UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                use_linear_projection=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                                num_hidden_layers=23, projection_dim=1024, hidden_act="gelu",
                                                vocab_size=tokenizer_vocab_size, max_position_embeddings=77))
    return unet, vae, text_encoder, classifier


def sdxl_models(tokenizer_vocab_size=49408):
    """SDXL base 1.0's UNet (1024 px: 128x128 latents, 320-640-1280 channels, 1-2-10 transformer layers, 2048-wide
    cross-attention, "text_time" added conditions), its VAE, and its two text encoders (CLIP ViT-L, OpenCLIP bigG
    with projection) as a ModuleList, and the same classifier, random: for counting memory and for benchmarks."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    _, _, first, classifier = sd15_models(tokenizer_vocab_size)
    unet = UNet2DConditionModel(
        sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    second = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
        hidden_act="gelu", vocab_size=tokenizer_vocab_size, max_position_embeddings=77))
    return unet, vae, torch.nn.ModuleList([first, second]), classifier


# SD 3.5's transformers, as their transformer/config.json on the hub (stabilityai/stable-diffusion-3.5-medium and
# -large): 2.5B and 8.1B weights; 16-channel latents in patches of 2, 4096-wide T5 text, 2048-wide pooled CLIP text.
SD35 = {"medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                       dual_attention_layers=tuple(range(13))),
        "large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192)}


def sd35_models(size, tokenizer_vocab_size=49408):
    """SD 3.5 medium's or large's transformer (1024 px: 128x128 latents of 16 channels), SD 3's VAE, its three text
    encoders (CLIP ViT-L and OpenCLIP bigG with projections, T5-XXL) as a ModuleList, and the same classifier,
    random: for counting memory (tests/count_memory.py --family sd35-medium, sd35-large)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    _, _, _, classifier = sd15_models(tokenizer_vocab_size)
    transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                        attention_head_dim=64, joint_attention_dim=4096, pooled_projection_dim=2048,
                                        qk_norm="rms_norm", **SD35[size])
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2,
                        sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False)
    clip = lambda width, layers, heads: CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads, num_hidden_layers=layers,
        projection_dim=width, hidden_act="gelu", vocab_size=tokenizer_vocab_size, max_position_embeddings=77))
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                 feed_forward_proj="gated-gelu"))
    return transformer, vae, torch.nn.ModuleList([clip(768, 12, 12), clip(1280, 32, 20), t5]), classifier


def sd15_models(tokenizer_vocab_size=49408):
    """SD v1.5's UNet, VAE and text encoder, and a ViT-base/16 classifier at 224 (as rizvandwiki's), random."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, ViTConfig, ViTForImageClassification
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD 1.5's config
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu",
                                                vocab_size=tokenizer_vocab_size, max_position_embeddings=77))
    classifier = ViTForImageClassification(ViTConfig(num_labels=2, id2label={0: "female", 1: "male"},
                                                     label2id={"female": 0, "male": 1}))
    return unet, vae, text_encoder, classifier


def make_sd15(path, seed=0):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import ViTImageProcessor
    from tests.fixtures import SD_SCHEDULER, make_tokenizer
    torch.manual_seed(seed)
    unet, vae, text_encoder, classifier = sd15_models()
    with tempfile.TemporaryDirectory() as vocab:  # a small vocabulary: the same sequence length
        tokenizer = make_tokenizer(vocab)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    classifier.save_pretrained(os.path.join(path, "classifier"))
    ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(os.path.join(path, "classifier"))


def make_sdxl(path, seed=0):
    """SDXL's shapes with random weights, saved in fp16 (5 GB, not 10: load_models casts them), with SDXL's own
    scheduler file (Euler, which load_models makes a DDIM)."""
    import json
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from transformers import ViTImageProcessor
    from tests.fixtures import SD_SCHEDULER, SDXL_SCHEDULER, make_tokenizer
    torch.manual_seed(seed)
    unet, vae, (first, second), classifier = sdxl_models()
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = make_tokenizer(vocab)
    StableDiffusionXLPipeline(vae=vae, text_encoder=first, text_encoder_2=second, tokenizer=tokenizer,
                              tokenizer_2=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER)
                              ).to(torch.float16).save_pretrained(path)
    with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SDXL_SCHEDULER, f)
    classifier.save_pretrained(os.path.join(path, "classifier"))
    ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(os.path.join(path, "classifier"))


def make_sd35(path, seed=0):
    """SD 3.5 medium's shapes with random weights, saved in fp16 (7 GB), without T5 (its 4.8B weights would add
    9.5 GB to the folder and are run once per prompt: the pipeline and load_flow_models put zeros in its place)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import ViTImageProcessor
    from tests.fixtures import SD3_SCHEDULER, make_tokenizer
    torch.manual_seed(seed)
    transformer, vae, (clip_l, clip_g, _), classifier = sd35_models("medium")
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = make_tokenizer(vocab)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                             vae=vae, text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g,
                             tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None
                             ).to(torch.float16).save_pretrained(path)
    classifier.save_pretrained(os.path.join(path, "classifier"))
    ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(os.path.join(path, "classifier"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])  # unknown flags are refused
    parser.add_argument("out_dir", help="the pipeline folder to write (the classifier goes in OUT_DIR/classifier)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models instead of SD 1.5's shapes")
    parser.add_argument("--sdxl", action="store_true", help="SDXL base's shapes (1024 px) instead of SD 1.5's")
    parser.add_argument("--sd35", action="store_true", help="SD 3.5 medium's shapes (1024 px, no T5)")
    args = parser.parse_args(argv)
    if args.sdxl and args.sd35:
        parser.error("--sdxl, --sd35: one family at a time")
    if args.tiny:  # the tests' tiny models, of SDXL's or SD 3's family with --sdxl or --sd35
        from tests.fixtures import make_tiny_classifier, make_tiny_sd, make_tiny_sd3, make_tiny_sdxl
        (make_tiny_sdxl if args.sdxl else make_tiny_sd3 if args.sd35 else make_tiny_sd)(args.out_dir)
        make_tiny_classifier(os.path.join(args.out_dir, "classifier"))
    elif args.sdxl:
        make_sdxl(args.out_dir)
    elif args.sd35:
        make_sd35(args.out_dir)
    else:
        make_sd15(args.out_dir)
    print(f"wrote {args.out_dir} and {args.out_dir}/classifier")
    return 0


if __name__ == "__main__":
    sys.exit(main())
