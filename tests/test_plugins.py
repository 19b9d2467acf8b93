import pytest
import torch

from qdc_export.errors import ModelLoadError
from qdc_export.load.models import CONFIG_PRESETS, build_preset, load_model
from qdc_export.load.plugins import adapter_for, layer_is_float


@pytest.mark.parametrize("preset, adapter_name, inputs", [
    ("tiny-unet2d", "unet2d", ["sample", "timestep"]),
    ("tiny-sd", "sd", ["sample", "timestep", "encoder_hidden_states"]),
    ("tiny-sdxl", "sdxl", ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]),
])
def test_adapter_inputs_and_wrapper_match_eager(preset, adapter_name, inputs):
    model = load_model(preset)
    assert model.adapter.name == adapter_name
    specs = model.adapter.input_specs(model.unet)
    assert [s.name for s in specs] == inputs
    assert all(s.shape[0] == "batch" for s in specs)
    example = model.adapter.example_inputs(model.unet, batch=3)
    wrapped = model.adapter.wrap(model.unet)
    with torch.no_grad():
        out = wrapped(*example)
        kwargs = {}
        if len(example) > 2:
            kwargs["encoder_hidden_states"] = example[2]
        if len(example) > 3:
            kwargs["added_cond_kwargs"] = {"text_embeds": example[3], "time_ids": example[4]}
        direct = model.unet(example[0], example[1], **kwargs).sample
    assert out.shape == model.adapter.output_spec(model.unet).concrete(3)
    assert torch.equal(out, direct)


def test_unsupported_architecture_is_a_user_error():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                cross_attention_dim=32, norm_num_groups=8, class_embed_type="timestep",
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        adapter_for(unet)


def test_float_layer_globs_and_include_override():
    globs = ("conv_in", "time_embedding.*", "*time_emb_proj")
    assert layer_is_float("time_embedding.linear_1", float_globs=globs, include=())
    assert layer_is_float("down_blocks.0.resnets.0.time_emb_proj", float_globs=globs, include=())
    assert not layer_is_float("down_blocks.0.resnets.0.conv1", float_globs=globs, include=())
    assert not layer_is_float("conv_in", float_globs=globs, include=("conv_*",))


def test_bare_unet_folder_and_pipeline_folder_load(tmp_path):
    unet = build_preset("tiny-unet2d")
    unet.save_pretrained(tmp_path / "bare", safe_serialization=True)
    with pytest.raises(ModelLoadError, match="no scheduler config"):  # built as its pipeline samples, or not at all
        load_model(str(tmp_path / "bare"))
    from diffusers import DDIMScheduler, DDPMScheduler

    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "bare")  # beside the UNet
    loaded = load_model(str(tmp_path / "bare"))
    assert loaded.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert loaded.adapter.name == "unet2d"
    for a, b in zip(unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)
    (tmp_path / "pipe").mkdir()
    unet.save_pretrained(tmp_path / "pipe" / "unet", safe_serialization=True)
    DDIMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "pipe" / "scheduler")
    piped = load_model(str(tmp_path / "pipe"))
    assert piped.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p, "not a diffusers folder"),
    (lambda p: (p / "config.json").write_text("{not json"), "cannot read"),
    (lambda p: (p / "config.json").write_text('{"_class_name": "AutoencoderKL"}'), "unsupported architecture"),
    (lambda p: (p / "config.json").write_text('{"_class_name": "UNet2DModel"}'), "no .safetensors"),
])
def test_bad_model_folders_are_user_errors(tmp_path, make_bad, message):
    make_bad(tmp_path)
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(tmp_path))


def test_pickle_weights_are_refused(tmp_path):
    unet = build_preset("tiny-unet2d")
    unet.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path))


def test_full_size_presets_are_published_configs():
    assert CONFIG_PRESETS["sd15"][1]["cross_attention_dim"] == 768
    assert CONFIG_PRESETS["sdxl"][1]["addition_embed_type"] == "text_time"


def test_reference_conditional_model_captures_with_its_table_sequence_length():
    """The conditioning table (4 tokens) fixes the sequence length, not the adapter's 77-token default."""
    from qdc_export.capture import capture

    model = load_model("digits-cond")
    specs = model.adapter.input_specs(model.unet)
    seq = model.conditioning.table["encoder_hidden_states"].shape[1]
    assert specs[2].shape == ("batch", seq, model.unet.config.cross_attention_dim)
    assert model.conditioning.specs == specs[2:]
    gm, example = capture(model.unet, model.adapter)
    cond, _ = model.conditioning.for_samples([0, 1, 2])
    with torch.no_grad():
        out = gm(torch.randn(3, 3, 32, 32), torch.full((3,), 500.0), cond["encoder_hidden_states"])
    assert out.shape == (3, 3, 32, 32)
