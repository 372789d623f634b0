"""ModelFolders: ComfyUI's layout and legacy folders, extra_model_paths.yaml, names as ComfyUI lists them,
escapes refused, the built-in model under its fixed names."""

import pytest

import kinema
from kinema.errors import KinemaError
from kinema.workflow.folders import BUILTIN, ModelFolders


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    touch(root / "diffusion_models" / "wan2.1_t2v_1.3B_fp16.safetensors")
    touch(root / "diffusion_models" / "wan" / "i2v" / "wan2.1_i2v_480p_14B_fp16.safetensors")
    touch(root / "unet" / "legacy.pth")
    touch(root / "diffusion_models" / "notes.txt")  # not a model file
    touch(root / "diffusion_models" / ".hidden.safetensors")
    touch(root / "diffusion_models" / "mydiffusers" / "config.json", b"{}")  # a checkpoint folder: one name
    touch(root / "diffusion_models" / "mydiffusers" / "diffusion_pytorch_model.safetensors")
    touch(root / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    touch(root / "clip" / "old_umt5.bin")
    touch(root / "vae" / "wan_2.1_vae.safetensors")
    touch(root / "clip_vision" / "clip_vision_h.safetensors")
    touch(root / "loras" / "style" / "a.safetensors")
    touch(root / "loras" / "b.ckpt")
    return root


def test_layout_aliases_and_names(models):
    f = ModelFolders(models)
    assert f.list("diffusion_models") == [
        "kinema_builtin_dit.safetensors", "legacy.pth", "mydiffusers", "wan/i2v/wan2.1_i2v_480p_14B_fp16.safetensors",
        "wan2.1_t2v_1.3B_fp16.safetensors"]
    assert f.list("unet") == f.list("diffusion_models")
    assert f.list("clip") == f.list("text_encoders") == [
        "kinema_builtin_umt5.safetensors", "old_umt5.bin", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"]
    assert f.list("vae") == ["kinema_builtin_vae.safetensors", "wan_2.1_vae.safetensors"]
    assert f.list("clip_vision") == ["kinema_builtin_clip_vision.safetensors", "clip_vision_h.safetensors"]
    assert f.list("loras") == ["b.ckpt", "style/a.safetensors"]  # no built-in LoRA
    assert f.path("unet", "wan/i2v/wan2.1_i2v_480p_14B_fp16.safetensors") == (
        models / "diffusion_models" / "wan" / "i2v" / "wan2.1_i2v_480p_14B_fp16.safetensors")
    assert f.path("diffusion_models", "legacy.pth") == models / "unet" / "legacy.pth"
    assert f.path("text_encoders", "old_umt5.bin") == models / "clip" / "old_umt5.bin"
    assert f.path("diffusion_models", "mydiffusers") == models / "diffusion_models" / "mydiffusers"
    assert ModelFolders(models, builtin=False).list("vae") == ["wan_2.1_vae.safetensors"]
    with pytest.raises(KinemaError, match="unknown model folder kind 'checkpoints'"):
        f.list("checkpoints")


def test_missing_file_names_it_and_the_folders(models):
    f = ModelFolders(models)
    with pytest.raises(KinemaError, match=r"vae file 'nope.safetensors' not found in .*models/vae.*wan_2.1_vae"):
        f.path("vae", "nope.safetensors")
    with pytest.raises(KinemaError, match="no models folder given"):
        ModelFolders().path("vae", "wan_2.1_vae.safetensors")
    with pytest.raises(KinemaError, match="is not a folder"):
        ModelFolders(models / "nowhere")


@pytest.mark.parametrize("name", ["../vae/wan_2.1_vae.safetensors", "wan/../../vae/wan_2.1_vae.safetensors",
                                  "/etc/passwd", "..\\vae\\wan_2.1_vae.safetensors", "..", ""])
def test_escapes_refused(models, name):
    with pytest.raises(KinemaError, match="outside the model folders|no diffusion_models file named"):
        ModelFolders(models).path("diffusion_models", name)


def test_extra_model_paths_yaml(models, tmp_path, monkeypatch):
    other = tmp_path / "other"
    touch(other / "my_unets" / "extra_dit.safetensors")
    touch(other / "unets2" / "second.safetensors")
    touch(other / "clips" / "extra_t5.safetensors")
    touch(tmp_path / "rel" / "vae_rel.safetensors")
    home = tmp_path / "home"
    touch(home / "loras_home" / "home_lora.safetensors")
    monkeypatch.setenv("HOME", str(home))
    touch(tmp_path / "first" / "vae" / "wan_2.1_vae.safetensors", b"first")
    yaml_path = tmp_path / "cfg" / "extra_model_paths.yaml"
    yaml_path.parent.mkdir()
    yaml_path.write_text(f"""
comfyui:
    base_path: {other}
    diffusion_models: |
        my_unets
        unets2
    clip: clips/
    checkpoints: checkpoints/
other_ui:
    loras: ~/loras_home
    vae: ../rel
preferred:
    base_path: ../first
    is_default: true
    vae: vae
empty:
""")
    f = ModelFolders(models, yaml_path)
    assert "extra_dit.safetensors" in f.list("diffusion_models") and "second.safetensors" in f.list("unet")
    assert f.path("diffusion_models", "second.safetensors") == other / "unets2" / "second.safetensors"
    assert f.path("text_encoders", "extra_t5.safetensors") == other / "clips" / "extra_t5.safetensors"
    assert f.path("loras", "home_lora.safetensors") == home / "loras_home" / "home_lora.safetensors"
    assert f.path("vae", "vae_rel.safetensors") == tmp_path / "rel" / "vae_rel.safetensors"  # relative to the YAML
    # is_default puts its folder first: the same name resolves there rather than under --models
    assert f.path("vae", "wan_2.1_vae.safetensors").read_bytes() == b"first"
    assert ModelFolders(models).path("vae", "wan_2.1_vae.safetensors").read_bytes() == b"x"
    bad = tmp_path / "bad.yaml"
    bad.write_text("comfyui: [unclosed")
    with pytest.raises(KinemaError, match="not valid YAML"):
        ModelFolders(extra_paths_yaml=bad)
    bad.write_text("comfyui: just a string")
    with pytest.raises(KinemaError, match="section 'comfyui' must map folder kinds"):
        ModelFolders(extra_paths_yaml=bad)
    with pytest.raises(KinemaError, match="cannot read the extra model paths file"):
        ModelFolders(extra_paths_yaml=tmp_path / "missing.yaml")


def test_builtin_names_resolve_to_loadable_parts():
    f = ModelFolders()
    for kind, (name, part) in BUILTIN.items():
        assert f.list(kind)[0] == name
        assert f.path(kind, name).name == part
    assert kinema.load_vae(f.path("vae", "kinema_builtin_vae.safetensors")).z_dim == 16
    te = kinema.load_text_encoder(f.path("clip", "kinema_builtin_umt5.safetensors"))
    assert te.encode(["a red circle"])[0].shape[1] == te.model.token_embedding.weight.shape[1]
    assert kinema.load_clip_vision(f.path("clip_vision", "kinema_builtin_clip_vision.safetensors")).image_size > 0
    assert kinema.load_dit(f.path("unet", "kinema_builtin_dit.safetensors")).config.num_layers > 0
    with pytest.raises(KinemaError, match="not found"):
        ModelFolders(builtin=False).path("vae", "kinema_builtin_vae.safetensors")
