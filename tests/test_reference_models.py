"""The shipped reference checkpoints (models/digits-*) load with plain diffusers and produce digits.

Tolerances (numbers are printed on failure):
* "not noise" statistics of 4 unconditional DDIM-10 samples, each compared with the real training data:
  - channel agreement: mean |per-pixel std over RGB| < 0.1 (data: 0; clamped noise: ~0.5)
  - spatial smoothness: horizontal-neighbour correlation > 0.75 (data: ~0.97; noise: ~0)
  - contrast: every image has p90 - p10 of its gray values >= 0.8 (data: ~1.6; the shipped
    uncond model at DDIM-10: 1.06-1.33 -- its background is dark gray rather than -1)
  - a logistic-regression digits classifier is confident: mean max-probability > 0.5
* conditional model, 20 samples (2 per class) with CFG at the recommended scale, DDIM 10 steps:
  the classifier (trained on sklearn digits in the same 32x32->8x8 round trip) agrees with the
  requested class on >= 70%.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the training helpers live with the training script
import reference_models as ref  # noqa: E402

MODELS = ref.MODELS_DIR


@pytest.fixture(scope="module")
def classifier():
    from sklearn.linear_model import LogisticRegression

    images8, labels = ref.load_digits_arrays()
    feats = ref.to_8x8(ref.to_model_space(images8)).numpy()
    clf = LogisticRegression(max_iter=3000, C=1.0)
    clf.fit(feats, labels.numpy())
    return clf


def _load(name: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

    folder = MODELS / name
    assert folder.is_dir(), f"missing shipped model folder {folder}"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    weights = sorted(p.name for p in (folder / "unet").iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt",
                                                                                    ".safetensors"})
    assert weights == ["diffusion_pytorch_model.safetensors"], weights
    cls = UNet2DConditionModel if name == "digits-cond" else UNet2DModel
    assert index["unet"] == ["diffusers", cls.__name__]
    unet = cls.from_pretrained(str(folder), subfolder="unet", use_safetensors=True).eval()
    sched = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    assert sched.config.num_train_timesteps == 1000
    assert sched.config.prediction_type == "epsilon"
    return folder, unet, sched


def _stats(images: torch.Tensor, clf) -> dict[str, float]:
    gray = images.mean(dim=1)
    a = gray[:, :, :-1].flatten()
    b = gray[:, :, 1:].flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    probs = clf.predict_proba(ref.to_8x8(images).numpy())
    return {
        "channel_std": images.std(dim=1).mean().item(),
        "neighbour_corr": corr,
        "min_contrast": (torch.quantile(gray.flatten(1), 0.9, dim=1)
                         - torch.quantile(gray.flatten(1), 0.1, dim=1)).min().item(),
        "clf_maxprob": float(probs.max(axis=1).mean()),
        "min": images.min().item(),
        "max": images.max().item(),
    }


def test_real_data_statistics_pass_the_bar(classifier):
    # sanity check of the thresholds themselves: real data passes, clamped noise does not
    images, _ = ref.build_digits_dataset()
    s = _stats(images[:64], classifier)
    assert s["channel_std"] < 0.1 and s["neighbour_corr"] > 0.75, s
    assert s["min_contrast"] >= 0.8 and s["clf_maxprob"] > 0.5, s
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    n = _stats(noise, classifier)
    assert n["channel_std"] > 0.1 and n["neighbour_corr"] < 0.75, n


def test_uncond_model_samples_digits(classifier):
    from diffusers import DiffusionPipeline

    folder, unet, sched = _load("digits-uncond")
    # the whole folder is also a loadable diffusers pipeline
    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    assert type(pipe).__name__ == "DDPMPipeline"

    images = ref.sample(unet, dict(sched.config), 4, steps=10, seed=0)
    assert images.shape == (4, 3, 32, 32)
    assert torch.isfinite(images).all()
    s = _stats(images, classifier)
    msg = f"unconditional samples look like noise: {s}"
    assert -1.0 <= s["min"] and s["max"] <= 1.0, msg
    assert s["channel_std"] < 0.1, msg
    assert s["neighbour_corr"] > 0.75, msg
    assert s["min_contrast"] >= 0.8, msg
    assert s["clf_maxprob"] > 0.5, msg


def test_cond_model_follows_class(classifier):
    from safetensors.torch import load_file

    folder, unet, sched = _load("digits-cond")
    assert unet.config.cross_attention_dim == ref.CROSS_ATTENTION_DIM
    assert unet.config.addition_embed_type is None
    cfg = json.loads((folder / "conditioning" / "config.json").read_text())
    assert cfg["num_classes"] == 10 and cfg["null_index"] == 10
    assert cfg["class_names"] == [str(i) for i in range(10)]
    table = load_file(str(folder / "conditioning" / "embeddings.safetensors"))["encoder_hidden_states"]
    assert table.dtype == torch.float32 and table.shape == (11, ref.COND_TOKENS, unet.config.cross_attention_dim)

    labels = torch.arange(10).repeat(2)
    images = ref.sample(unet, dict(sched.config), len(labels), steps=10, seed=0, labels=labels, table=table,
                        guidance_scale=cfg["guidance_scale"])
    s = _stats(images, classifier)
    pred = torch.as_tensor(classifier.predict(ref.to_8x8(images).numpy()))
    acc = (pred == labels).float().mean().item()
    print(f"digits-cond: classifier accuracy {acc:.2f} over {len(labels)} samples; stats {s}")
    assert acc >= 0.7, (f"conditional accuracy {acc:.2f} < 0.70; requested {labels.tolist()} "
                        f"predicted {pred.tolist()}; stats {s}")
    assert s["channel_std"] < 0.1 and s["neighbour_corr"] > 0.75, s


def test_checkpoint_sizes():
    for name in ref.MODEL_NAMES:
        size = sum(p.stat().st_size for p in (MODELS / name).rglob("*") if p.is_file())
        assert size < 15 * 2**20, (name, size)
