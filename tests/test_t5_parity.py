"""umT5 text encoder: numerical parity with transformers' UMT5EncoderModel in every checkpoint format.

A small random umT5 (odd sizes, attention width != model width, sequences past
the 128-token bucket limit) is saved in each format Kinema reads, loaded back
through `load_text_encoder`, and compared with the transformers model on a
padded batch. A tiny SentencePiece tokenizer trained here stands in for
google/umt5-xxl, in both its spiece.model and tokenizer.json forms.
"""

from __future__ import annotations

import html
import io
import math
import shutil

import pytest
import torch
import transformers
from conftest import rel_err
from safetensors.torch import save_file

from kinema.errors import CheckpointError, KinemaError
from kinema.loading.t5 import OFFICIAL_FILE, load_text_encoder
from kinema.text.tokenizer import UMT5Tokenizer, clean_text

VOCAB, DIM, D_KV, HEADS, FFN, LAYERS = 160, 72, 10, 6, 100, 3
SENTENCES = [
    "A cat walks on the grass in the morning light.",
    "Un chat marche sur l'herbe verte pendant que le soleil se lève.",
    "Ein Hund läuft am Strand entlang, während die Sonne untergeht.",
    "The quick brown fox jumps over the lazy dog & the cat.",
    "一只猫在草地上行走。",
    "Camera pans slowly across a futuristic city at night, neon lights reflecting on wet streets.",
]
PROMPTS = [
    "A cat walks on the grass.",
    "Camera pans slowly across a futuristic city at night, neon lights reflecting on wet streets, "
    "while a dog runs on the beach and the quick brown fox jumps over the lazy dog. " * 3,
    "  Ein   Hund &amp;amp; eine Katze\n\tam Strand  ",
]


# ---------------------------------------------------------------- fixtures


def _train_tokenizer(folder):
    """spiece.model and an equivalent tokenizer.json (T5 layout: <pad>=0, </s>=1, <unk>=2)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    buf = io.BytesIO()
    # Identity normalisation, so the tokenizers-library twin below needs no precompiled charsmap.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_writer=buf, vocab_size=150, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        normalization_rule_name="identity", minloglevel=2,
    )  # fmt: skip
    (folder / "spm").mkdir()
    (folder / "spm" / "spiece.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    meta = dict(replacement="▁", prepend_scheme="always", split=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**meta)])
    tok.decoder = decoders.Metaspace(**meta)
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    (folder / "tok").mkdir()
    tok.save(str(folder / "tok" / "tokenizer.json"))
    return buf.getvalue()


def _random_umt5():
    cfg = transformers.UMT5Config(
        vocab_size=VOCAB, d_model=DIM, d_kv=D_KV, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.UMT5EncoderModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name or p.dim() == 2 and p.shape[0] == VOCAB:
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # Linear [out, in]
                # T5 has no 1/sqrt(d) in attention: like its own init, fold that scale into q, or the
                # random logits get so sharp that bf16 rounding is amplified past any fair tolerance.
                std = 1 / math.sqrt(p.shape[1]) / (math.sqrt(D_KV) if ".q." in name else 1)
                p.copy_(torch.randn(p.shape, generator=g) * std)
        model.encoder.embed_tokens.weight = model.shared.weight
    return model


def _official_names(hf_sd):
    """Rename transformers keys to the official Wan2.1 ones (an independent table from the loader's)."""
    out = {"token_embedding.weight": hf_sd["shared.weight"], "norm.weight": hf_sd["encoder.final_layer_norm.weight"]}
    for i in range(LAYERS):
        pre = f"encoder.block.{i}.layer."
        for n in "qkvo":
            out[f"blocks.{i}.attn.{n}.weight"] = hf_sd[f"{pre}0.SelfAttention.{n}.weight"]
        out[f"blocks.{i}.pos_embedding.embedding.weight"] = hf_sd[f"{pre}0.SelfAttention.relative_attention_bias.weight"]
        out[f"blocks.{i}.norm1.weight"] = hf_sd[f"{pre}0.layer_norm.weight"]
        out[f"blocks.{i}.norm2.weight"] = hf_sd[f"{pre}1.layer_norm.weight"]
        out[f"blocks.{i}.ffn.gate.0.weight"] = hf_sd[f"{pre}1.DenseReluDense.wi_0.weight"]
        out[f"blocks.{i}.ffn.fc1.weight"] = hf_sd[f"{pre}1.DenseReluDense.wi_1.weight"]
        out[f"blocks.{i}.ffn.fc2.weight"] = hf_sd[f"{pre}1.DenseReluDense.wo.weight"]
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    spiece = _train_tokenizer(root)
    ref = _random_umt5()
    sd = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    # Lengths 150 (past max_distance 128, so the clipped buckets matter), 37 and 5: padding in the batch.
    lengths = [150, 37, 5]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        ids[i, n - 1] = 1
        mask[i, :n] = 1
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    save_file(sd, str(root / "umt5_hf.safetensors"))
    return dict(root=root, spiece=spiece, ref=ref, sd=sd, ids=ids, mask=mask, out=out)


def _run(te, env):
    with torch.no_grad():
        return te.model(env["ids"], env["mask"]).float()


def _tokenizes_as_transformers(te, env):
    """The loader found the right tokenizer: its ids are transformers' for the test's tokenizer.json."""
    hf = transformers.T5TokenizerFast(tokenizer_file=str(env["root"] / "tok" / "tokenizer.json"))
    for text in PROMPTS + SENTENCES:
        assert te.tokenizer.token_ids(text) == hf(clean_text(text), truncation=True, max_length=512).input_ids, text


# ---------------------------------------------------------------- parity per format


def _hf_variants(sd):
    no_prefix = {k.removeprefix("encoder."): v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    no_shared = {k: v for k, v in sd.items() if k != "shared.weight"}
    # A full encoder-decoder checkpoint: the decoder and LM head are skipped.
    with_decoder = {**sd, "decoder.block.0.layer.0.SelfAttention.q.weight": torch.ones(2), "lm_head.weight": torch.ones(2)}
    return {"both_embeddings": sd, "no_encoder_prefix": no_prefix, "no_shared": no_shared, "with_decoder": with_decoder}


@pytest.mark.parametrize("variant", ["both_embeddings", "no_encoder_prefix", "no_shared", "with_decoder"])
def test_huggingface_safetensors(env, variant):
    path = env["root"] / f"umt5_{variant}.safetensors"
    save_file(_hf_variants(env["sd"])[variant], str(path))
    te = load_text_encoder(path, tokenizer=env["root"] / "tok")
    err = rel_err(_run(te, env), env["out"])
    print(f"hf {variant}: {err:.2e}")
    assert err <= 1e-4


def test_official_pth_folder_fp32_and_bf16(env):
    folder = env["root"] / "Wan2.1-T2V-tiny"
    (folder / "google" / "umt5-xxl").mkdir(parents=True)
    shutil.copy(env["root"] / "tok" / "tokenizer.json", folder / "google" / "umt5-xxl")
    torch.save(_official_names(env["sd"]), folder / OFFICIAL_FILE)
    # A DiT-like file beside it must not be picked up.
    save_file({"patch_embedding.weight": torch.zeros(2)}, str(folder / "diffusion_pytorch_model.safetensors"))
    te = load_text_encoder(folder)  # tokenizer found in google/umt5-xxl/
    assert te.tokenizer.source.endswith("tokenizer.json")
    _tokenizes_as_transformers(te, env)
    err = rel_err(_run(te, env), env["out"])
    print(f"official fp32: {err:.2e}")
    assert err <= 1e-4

    te16 = load_text_encoder(folder, dtype=torch.bfloat16)
    assert te16.model.blocks[0].attn.q.weight.dtype == torch.bfloat16
    err16 = rel_err(_run(te16, env), env["out"])
    print(f"official bf16: {err16:.2e}")
    assert err16 <= 2e-2


def test_diffusers_folders(env):
    pipe = env["root"] / "diffusers_pipe"
    env["ref"].save_pretrained(pipe / "text_encoder")
    shutil.copytree(env["root"] / "tok", pipe / "tokenizer")
    te = load_text_encoder(pipe)  # pipeline root: text_encoder/ + tokenizer/
    err = rel_err(_run(te, env), env["out"])
    _tokenizes_as_transformers(te, env)

    sharded = env["root"] / "diffusers_sharded"
    env["ref"].save_pretrained(sharded / "text_encoder", max_shard_size="40KB")
    assert (sharded / "text_encoder" / "model.safetensors.index.json").exists()
    shutil.copytree(env["root"] / "spm", sharded / "tokenizer")
    te_sh = load_text_encoder(sharded / "text_encoder")  # component folder; tokenizer in ../tokenizer
    assert te_sh.tokenizer.source.endswith("spiece.model")
    _tokenizes_as_transformers(te_sh, env)
    err_sh = rel_err(_run(te_sh, env), env["out"])
    print(f"diffusers: {err:.2e}, sharded: {err_sh:.2e}")
    assert err <= 1e-4 and err_sh <= 1e-4


def test_comfyui_scaled_fp8(env):
    sd, deq = {}, {}
    for k, v in env["sd"].items():
        if k == "encoder.embed_tokens.weight":
            continue
        if v.dim() == 2 and ("SelfAttention." in k and "relative" not in k or "DenseReluDense" in k):
            scale = v.abs().max().float() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            sd[k], sd[k.removesuffix(".weight") + ".scale_weight"] = q, scale.reshape(())
            deq[k] = q.float() * scale
        else:
            sd[k] = v
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    # ComfyUI's files carry their SentencePiece tokenizer; with tokenizer=None it is used.
    sd["spiece_model"] = torch.frombuffer(bytearray(env["spiece"]), dtype=torch.uint8)
    path = env["root"] / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(sd, str(path))

    ref = _random_umt5()
    ref.load_state_dict({**env["sd"], **deq, "encoder.embed_tokens.weight": env["sd"]["shared.weight"]})
    with torch.no_grad():
        want = ref(input_ids=env["ids"], attention_mask=env["mask"]).last_hidden_state
    te = load_text_encoder(path)
    assert te.tokenizer.source.endswith(":spiece_model")
    _tokenizes_as_transformers(te, env)  # the SentencePiece model read back from the file's bytes
    got = _run(te, env)
    err = rel_err(got, want)
    print(f"scaled fp8 vs dequantised ref: {err:.2e} (vs unquantised: {rel_err(got, env['out']):.2e})")
    assert err <= 1e-4
    assert rel_err(got, env["out"]) > 1e-3  # the quantisation really happened


# ---------------------------------------------------------------- tokenizer and encode()


def _reference_clean(text):
    """Wan2.1's wan/modules/tokenizers.py cleaning ('whitespace'), which uses the `regex` module."""
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


def test_clean_text():
    assert clean_text("  Ein   Hund &amp;amp; eine Katze\n\tam Strand  ") == "Ein Hund & eine Katze am Strand"
    assert clean_text("âœ” No problems") == "✔ No problems"  # mojibake repaired by ftfy
    assert clean_text("a&lt;b&gt;\u3000c\u00a0d") == "a<b> c d"
    # \x1c-\x1f are whitespace to `re` but not to `regex`; ftfy and html.unescape drop them first.
    tricky = ["x\x1cy\x1dz\x1e\x1f", "a&#28;b", "a&amp;#28;b", "\u2028l\u2029m\u0085n", "&amp;nbsp;x", "ﬁne  ｗｉｄｅ", ""]
    for text in tricky + PROMPTS:
        assert clean_text(text) == _reference_clean(text), repr(text)


def test_tokenizer_backends_agree_with_transformers(env):
    from_json = UMT5Tokenizer.from_path(env["root"] / "tok")
    from_spm = UMT5Tokenizer.from_path(env["root"] / "spm" / "spiece.model")
    hf = transformers.T5TokenizerFast(tokenizer_file=str(env["root"] / "tok" / "tokenizer.json"))
    long = "the cat " * 400  # 800+ tokens: truncated to 511 + </s>
    for text in PROMPTS + SENTENCES + [long, ""]:
        a, b = from_json.token_ids(text), from_spm.token_ids(text)
        want = hf(clean_text(text), truncation=True, max_length=512).input_ids
        assert a == b == want, text
        assert a[-1] == 1
    assert len(from_json.token_ids(long)) == 512
    ids, mask = from_json(["a cat", long])
    assert ids.shape == (2, 512) and mask[0].sum() == len(from_json.token_ids("a cat")) and (ids[0, mask[0] == 0] == 0).all()


def test_encode_trims_and_matches_reference(env):
    te = load_text_encoder(env["root"] / "umt5_hf.safetensors", tokenizer=env["root"] / "tok")
    prompts = PROMPTS + [""]
    out = te.encode(prompts)
    hf_tok = transformers.T5TokenizerFast(tokenizer_file=str(env["root"] / "tok" / "tokenizer.json"))
    cleaned = [clean_text(p) for p in prompts]
    # The reference: pad to 512, run transformers, cut each row to its mask length.
    batch = hf_tok(cleaned, padding="max_length", truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        ref = env["ref"](**batch).last_hidden_state
    ids, mask = te.tokenizer(prompts)
    with torch.no_grad():
        direct = te.model(ids, mask)
    for i, u in enumerate(out):
        n = int(batch.attention_mask[i].sum())  # real tokens + </s>
        assert u.shape == (n, DIM)
        assert torch.equal(u, direct[i, :n])
        assert rel_err(u, ref[i, :n]) <= 1e-4
    assert te.encode([]) == []


# ---------------------------------------------------------------- errors


def _save(env, name, sd):
    path = env["root"] / "bad" / name
    path.parent.mkdir(exist_ok=True)
    save_file(sd, str(path))
    return path


def test_missing_and_truncated_files(env):
    with pytest.raises(CheckpointError, match="not found"):
        load_text_encoder(env["root"] / "nope.safetensors", tokenizer=env["root"] / "tok")
    good = (env["root"] / "umt5_hf.safetensors").read_bytes()
    path = env["root"] / "bad" / "truncated.safetensors"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_text_encoder(path, tokenizer=env["root"] / "tok")


def test_wrong_component(env):
    vae = {"decoder.conv1.weight": torch.zeros(4, 4, 3, 3, 3), "encoder.conv1.weight": torch.zeros(4)}
    vae = _save(env, "vae.safetensors", vae)
    with pytest.raises(CheckpointError, match=r"holds a VAE.*load_vae"):
        load_text_encoder(vae, tokenizer=env["root"] / "tok")
    dit = _save(env, "dit.safetensors", {
        "patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.zeros(8, 8),
        "time_embedding.0.weight": torch.zeros(8, 8),
    })  # fmt: skip
    with pytest.raises(CheckpointError, match=r"diffusion transformer.*load_dit"):
        load_text_encoder(dit, tokenizer=env["root"] / "tok")


def test_unknown_key_and_wrong_shape(env):
    sd = dict(env["sd"])
    sd["encoder.block.1.layer.0.SelfAttention.extra.weight"] = torch.zeros(3)
    path = _save(env, "unknown.safetensors", sd)
    with pytest.raises(CheckpointError, match=r"unknown keys.*SelfAttention\.extra\.weight"):
        load_text_encoder(path, tokenizer=env["root"] / "tok")

    official = {**_official_names(env["sd"]), "blocks.1.attn.extra.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.extra\.weight"):
        load_text_encoder(_save(env, "unknown_official.safetensors", official), tokenizer=env["root"] / "tok")

    sd = dict(env["sd"])
    sd["encoder.block.2.layer.1.DenseReluDense.wo.weight"] = torch.zeros(DIM, FFN + 1)
    path = _save(env, "shape.safetensors", sd)
    with pytest.raises(CheckpointError) as info:
        load_text_encoder(path, tokenizer=env["root"] / "tok")
    msg = str(info.value)
    assert "shape.safetensors" in msg and "encoder.block.2.layer.1.DenseReluDense.wo.weight" in msg
    assert f"[{DIM}, {FFN}]" in msg and f"[{DIM}, {FFN + 1}]" in msg

    sd = {k: v for k, v in env["sd"].items() if "block.1.layer.0.SelfAttention.relative" not in k}
    sd = {k: v for k, v in sd.items() if "block.2.layer.0.SelfAttention.relative" not in k}
    with pytest.raises(CheckpointError, match="T5 v1.1"):
        load_text_encoder(_save(env, "t5v11.safetensors", sd), tokenizer=env["root"] / "tok")


def test_tokenizer_not_found(env):
    folder = env["root"] / "lonely"
    folder.mkdir()
    shutil.copy(env["root"] / "umt5_hf.safetensors", folder)
    with pytest.raises(KinemaError, match=r"no umT5 tokenizer found.*lonely.*tokenizer="):
        load_text_encoder(folder)
    with pytest.raises(KinemaError, match="tokenizer not found"):
        load_text_encoder(folder, tokenizer=folder / "missing")
