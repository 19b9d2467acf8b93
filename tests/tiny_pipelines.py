"""Tiny Stable Diffusion and SDXL pipelines assembled locally from configs (random weights, no hub): a CLIP
tokenizer written from a small character vocabulary, tiny CLIP text encoders, a tiny VAE, and the UNet of the
tiny-sd / tiny-sdxl presets with the preset's recorded scheduler."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from qdc_export.load.models import load_model

SEQUENCE_LENGTH = 8  # the tiny presets' qdc_sequence_length


def make_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single characters (no merges): every letter is a token."""
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + \
        [c + "</w>" for c in string.ascii_lowercase]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=SEQUENCE_LENGTH)


def _text_config(hidden: int, vocab: int, projection: int = 0) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=SEQUENCE_LENGTH,
                          projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def make_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=32).eval()


def preset_scheduler(preset: str) -> DDIMScheduler:
    return DDIMScheduler.from_config(load_model(preset).scheduler_config)


def sd_pipeline(tmp: Path) -> StableDiffusionPipeline:
    tokenizer = make_tokenizer(tmp / "tokenizer")
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config(32, len(tokenizer))).eval()
    pipe = StableDiffusionPipeline(vae=make_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=load_model("tiny-sd").unet, scheduler=preset_scheduler("tiny-sd"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(tmp: Path) -> StableDiffusionXLPipeline:
    tokenizer = make_tokenizer(tmp / "tokenizer")
    torch.manual_seed(3)
    # encoder_hidden_states = both encoders' penultimate states side by side (16 + 16 = the UNet's 32);
    # text_embeds = the second encoder's projection (16 = 64 - 6 * addition_time_embed_dim 8).
    encoder_1 = CLIPTextModel(_text_config(16, len(tokenizer))).eval()
    encoder_2 = CLIPTextModelWithProjection(_text_config(16, len(tokenizer), projection=16)).eval()
    pipe = StableDiffusionXLPipeline(vae=make_vae(), text_encoder=encoder_1, text_encoder_2=encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=load_model("tiny-sdxl").unet,
                                     scheduler=preset_scheduler("tiny-sdxl"), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
