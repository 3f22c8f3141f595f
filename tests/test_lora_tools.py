"""networks/ tools: merge (into a model and into one LoRA), svd merge, resize, extract, check --verify.

All on the tiny SD1.5-structured model; LoRA files come from networks.lora with random up weights.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.lora_tools import svd
from library.lora_tools.weights import read_lora
from library.models.tiny import build_tiny_components
from networks import check_lora_weights, extract_lora_from_models, lora, merge_lora, resize_lora, svd_merge_lora
from networks import lora_format as fmt


# --- helpers ---------------------------------------------------------------------------------

def make_lora(path, seed, dim=8, alpha=4.0, conv=False, keep=None):
    """A LoRA for the tiny model with random (non-zero) up weights; `keep` filters module names."""
    unet, vae, te = build_tiny_components(0)
    torch.manual_seed(seed)
    kwargs = {"conv_dim": "4", "conv_alpha": "2"} if conv else {}
    net = lora.create_network(1.0, dim, alpha, vae, te, unet, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.all_loras():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.05)
    net.save_weights(path, None, {"ss_network_dim": str(dim)})
    if keep is not None:
        sd = {k: v for k, v in load_file(path).items() if keep(k)}
        path.write_bytes(fmt.serialize_with_hashes(sd, {"ss_network_dim": str(dim)}))
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {"a": make_lora(root / "a.safetensors", 1),
            "b": make_lora(root / "b.safetensors", 2, dim=4, alpha=1.0, conv=True)}


def inputs():
    g = torch.Generator().manual_seed(123)
    return {"ids": torch.randint(0, 49406, (2, 8), generator=g), "sample": torch.randn(2, 4, 16, 16, generator=g),
            "hidden": torch.randn(2, 8, 32, generator=g)}


@torch.no_grad()
def outputs(unet, te, x):
    return (unet(x["sample"], 10, encoder_hidden_states=x["hidden"]).sample,
            te(input_ids=x["ids"]).last_hidden_state)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def applied_outputs(files, ratios, x):
    """Base tiny model with the LoRAs patched in by networks.lora at the given multipliers."""
    unet, vae, te = build_tiny_components(0)
    for path, ratio in zip(files, ratios):
        net, weights = lora.create_network_from_weights(ratio, path, vae, te, unet)
        net.apply_to(te, unet)
        net.load_state_dict(weights)
    return outputs(unet, te, x)


def weighted_deltas(files, ratios):
    """name -> sum of ratio * (alpha/r) up @ down over the files (what a merge must apply)."""
    total = {}
    for path, ratio in zip(files, ratios):
        for name, m in read_lora(path).modules.items():
            d = m.delta(ratio)
            total[name] = total[name] + d if name in total else d
    return total


# --- merge into a model ----------------------------------------------------------------------

def test_merge_into_model_equals_applied_loras_and_loads_everywhere(tiny_model, loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    from library.models.loading import load_sd_model

    out = tmp_path / "merged.safetensors"
    files, ratios = [loras["a"], loras["b"]], [0.7, 0.5]
    merge_lora.main(["--sd_model", str(tiny_model.single_file), "--models", *map(str, files),
                     "--ratios", "0.7", "0.5", "--save_to", str(out)])
    x = inputs()
    want = applied_outputs(files, ratios, x)
    merged = load_sd_model(out)
    got = outputs(merged.unet, merged.text_encoder, x)
    base_unet, _, base_te = build_tiny_components(0)
    for g, w, b in zip(got, want, outputs(base_unet, base_te, x)):
        assert rel_err(w, b) > 1e-3  # the LoRAs change the outputs
        assert rel_err(g, w) < 1e-5

    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_model.diffusers_dir),
                                                    local_files_only=True, safety_checker=None)
    for g, w in zip(outputs(pipe.unet, pipe.text_encoder, x), want):
        assert rel_err(g, w) < 1e-5

    with safe_open(str(out), "pt") as fh:
        recipe = json.loads(fh.metadata()["sd_merge_recipe"])
    assert [(s["file"], s["ratio"]) for s in recipe["loras"]] == [("a.safetensors", 0.7), ("b.safetensors", 0.5)]
    assert recipe["loras"][0]["sshs_model_hash"] == fmt.data_section_sha256(loras["a"])


def test_merge_refuses_loras_that_do_not_fit_the_model(tiny_model, loras, tmp_path):
    sd = load_file(loras["a"])
    # an SD2-style text encoder (1024 wide, 23 layers) and an SDXL-style name
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(8, 1024)
    for name in ("lora_te_text_model_encoder_layers_22_mlp_fc1", "lora_te1_text_model_encoder_layers_0_mlp_fc1"):
        sd.update({f"{name}.lora_down.weight": torch.zeros(8, 32), f"{name}.lora_up.weight": torch.zeros(128, 8),
                   f"{name}.alpha": torch.tensor(4.0)})
    save_file(sd, str(tmp_path / "sd2.safetensors"))
    out = tmp_path / "m.safetensors"
    with pytest.raises(UserError) as err:
        merge_lora.main(["--sd_model", str(tiny_model.diffusers_dir), "--models", str(tmp_path / "sd2.safetensors"),
                         "--save_to", str(out)])
    text = str(err.value)
    assert "lora_te_text_model_encoder_layers_22_mlp_fc1" in text and "lora_te1_text_model" in text
    assert "2 modules name layers the model does not have" in text
    assert "layers_0_mlp_fc1 (the layer is 32 -> 128, the LoRA 1024 -> 128)" in text
    assert not out.exists()


# --- merging LoRAs into one ------------------------------------------------------------------

def test_concat_merge_applies_exactly_the_weighted_sum(loras, tmp_path, capsys):
    out = tmp_path / "ab.safetensors"
    files, ratios = [loras["a"], loras["b"]], [0.7, -0.5]
    merge_lora.main(["--models", *map(str, files), "--ratios", "0.7", "-0.5", "--save_to", str(out), "--concat"])
    merged = read_lora(out)
    want = weighted_deltas(files, ratios)
    assert set(merged.modules) == set(want)
    for name, m in merged.modules.items():
        assert torch.allclose(m.delta(), want[name], atol=1e-6, rtol=1e-5), name
    a, b = read_lora(files[0]).modules, read_lora(files[1]).modules
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    assert merged.modules[name].rank == a[name].rank + b[name].rank
    assert check_lora_weights.main(["--verify", str(out)]) == 0
    meta = merged.metadata
    assert [s["ratio"] for s in json.loads(meta["ss_merged_from"])] == [0.7, -0.5]
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_output_name"] == "ab"


def test_svd_merge_error_is_the_truncation_error_and_is_reported(loras, tmp_path, capsys):
    out = tmp_path / "ab4.safetensors"
    files = [loras["a"], loras["b"]]
    svd_merge_lora.main(["--models", *map(str, files), "--ratios", "0.7", "0.5", "--new_rank", "4",
                         "--new_conv_rank", "2", "--save_to", str(out)])
    printed = capsys.readouterr().out
    merged = read_lora(out)
    want = weighted_deltas(files, [0.7, 0.5])
    assert set(merged.modules) == set(want)
    for name, m in merged.modules.items():
        s = torch.linalg.svdvals(want[name].flatten(1).double())
        assert m.rank == min(2 if m.is_conv3x3 else 4, int((s > 1e-9 * s[0]).sum()))
        dropped = float(s[m.rank:].square().sum().sqrt())
        assert float((m.delta() - want[name]).norm()) == pytest.approx(dropped, rel=1e-3, abs=1e-5), name
    assert {m.alpha for m in merged.modules.values() if not m.is_conv3x3} == {4.0}
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q: rank 12 -> 4, retained " \
           "Frobenius norm" in printed
    assert "total error" in printed


def test_merging_loras_of_different_models_is_refused(loras, tmp_path):
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    other = {f"{name}.lora_down.weight": torch.ones(4, 320), f"{name}.lora_up.weight": torch.ones(320, 4),
             f"{name}.alpha": torch.tensor(4.0)}
    save_file(other, str(tmp_path / "big.safetensors"))
    with pytest.raises(UserError, match="made for different models"):
        merge_lora.main(["--models", str(loras["a"]), str(tmp_path / "big.safetensors"),
                         "--save_to", str(tmp_path / "x.safetensors")])


# --- resize ----------------------------------------------------------------------------------

def test_resize_error_equals_the_discarded_singular_values(loras, tmp_path, capsys):
    out = tmp_path / "a3.safetensors"
    resize_lora.main(["--model", str(loras["a"]), "--new_rank", "3", "--save_to", str(out)])
    printed = capsys.readouterr().out
    before, after = read_lora(loras["a"]).modules, read_lora(out).modules
    for name, m in after.items():
        old = before[name].delta()
        s = torch.linalg.svdvals(old.flatten(1).double())
        assert m.rank == 3
        assert float((m.delta() - old).norm()) == pytest.approx(float(s[3:].square().sum().sqrt()), rel=1e-3), name
        retained = math.sqrt(float(s[:3].square().sum() / s.square().sum()))
        assert f"{name}: rank 8 -> 3, retained Frobenius norm {100 * retained:.2f}%" in printed
    assert {m.alpha for m in after.values()} == {4.0 / 8 * 3}  # the file's scale carries over, as in kohya


def test_rank_selection_rules():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    assert svd.select_rank(s, 10) == 5 and svd.select_rank(s, 3) == 3
    assert svd.select_rank(s, 10, "sv_ratio", 3) == 2  # values > 8/3
    assert svd.select_rank(s, 10, "sv_ratio", 16) == 4  # values > 0.5 (not equal)
    # Frobenius shares: sqrt(64/85.25)=0.866, sqrt(80/85.25)=0.969
    assert svd.select_rank(s, 10, "sv_fro", 0.9) == 2 and svd.select_rank(s, 10, "sv_fro", 0.85) == 1
    # cumulative shares of sum(S)=15.5: 0.516, 0.774, 0.903, 0.968
    assert svd.select_rank(s, 10, "sv_cumulative", 0.9) == 3
    assert svd.select_rank(s, 10, "sv_cumulative", 14 / 15.5) == 3  # exactly reached counts
    assert svd.select_rank(s, 2, "sv_cumulative", 0.9) == 2  # --new_rank caps it
    assert svd.select_rank(torch.zeros(4), 4, "sv_fro", 0.9) == 1


@pytest.mark.parametrize("method,param,rank", [("sv_ratio", "3", 2), ("sv_fro", "0.9", 2), ("sv_cumulative", "0.9", 3)])
def test_dynamic_resize_picks_the_documented_rank(tmp_path, method, param, rank):
    """A module with known singular values 8, 4, 2, 1, 0.5 (orthonormal factors, alpha = rank)."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(32, 5, generator=g))
    v, _ = torch.linalg.qr(torch.randn(32, 5, generator=g))
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    src = tmp_path / "known.safetensors"
    save_file({f"{name}.lora_down.weight": v.T.contiguous(), f"{name}.lora_up.weight": (u * s).contiguous(),
               f"{name}.alpha": torch.tensor(5.0)}, str(src))
    out = tmp_path / "dyn.safetensors"
    resize_lora.main(["--model", str(src), "--new_rank", "8", "--dynamic_method", method, "--dynamic_param", param,
                      "--save_to", str(out)])
    m = read_lora(out).modules[name]
    assert m.rank == rank
    assert torch.allclose(torch.linalg.svdvals(m.delta())[:rank + 1], torch.cat([s[:rank], torch.zeros(1)]), atol=1e-5)
    assert read_lora(out).metadata["ss_network_dim"] == "Dynamic"


# --- extract ---------------------------------------------------------------------------------

def test_extract_recovers_a_known_low_rank_delta(tiny_model, loras, tmp_path, capsys):
    """tuned = base + a U-Net-only LoCon (merged in); the extraction gives back its deltas, and
    leaves out the unchanged text encoder."""
    unet_only = make_lora(tmp_path / "u.safetensors", 3, dim=4, alpha=2.0, conv=True,
                          keep=lambda k: k.startswith("lora_unet_"))
    tuned = tmp_path / "tuned.safetensors"
    merge_lora.main(["--sd_model", str(tiny_model.single_file), "--models", str(unet_only), "--save_to", str(tuned)])
    out = tmp_path / "extracted.safetensors"
    extract_lora_from_models.main(["--model_org", str(tiny_model.diffusers_dir), "--model_tuned", str(tuned),
                                   "--dim", "4", "--conv_dim", "4", "--clamp_quantile", "1",
                                   "--save_to", str(out)])
    assert "the text encoder is unchanged" in capsys.readouterr().out
    got, want = read_lora(out).modules, read_lora(unet_only).modules
    assert set(got) == set(want)
    for name, m in got.items():
        assert m.rank == 4
        assert torch.allclose(m.delta(), want[name].delta(), atol=2e-6, rtol=1e-4), name
    assert check_lora_weights.main(["--verify", str(out)]) == 0

    with pytest.raises(UserError, match="nothing to extract"):
        extract_lora_from_models.main(["--model_org", str(tiny_model.diffusers_dir), "--model_tuned", str(tuned),
                                       "--min_diff", "10", "--save_to", str(tmp_path / "none.safetensors")])


def test_clamp_quantile_clips_the_factors():
    from library.lora_tools.extract import clamp_factors

    down, up = torch.randn(4, 100), torch.randn(50, 4)
    assert clamp_factors(down, up, 1.0) == (down, up)
    d, u = clamp_factors(down, up, 0.9)
    hi = float(torch.quantile(torch.cat([down.flatten(), up.flatten()]).abs(), 0.9))
    assert max(float(d.abs().max()), float(u.abs().max())) == pytest.approx(hi)
    assert torch.equal(d[down.abs() <= hi], down[down.abs() <= hi])


# --- check_lora_weights ----------------------------------------------------------------------

def _mutations():
    te_q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"

    def add_module(sd, meta):
        name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn9_to_q"
        sd.update({f"{name}.lora_down.weight": torch.zeros(8, 96), f"{name}.lora_up.weight": torch.zeros(96, 8),
                   f"{name}.alpha": torch.tensor(4.0)})

    def set_(key, fn):
        def mutate(sd, meta):
            sd[key] = fn(sd[key])
        return mutate

    def short_te(sd, meta):
        for key in [k for k in sd if k.startswith("lora_te_text_model_")]:
            sd["lora_te_" + key[len("lora_te_text_model_"):]] = sd.pop(key)

    def flat_proj(sd, meta):
        for suffix in (".lora_down.weight", ".lora_up.weight"):
            sd[proj + suffix] = sd[proj + suffix][:, :, 0, 0].contiguous()

    def nan(value):
        value = value.clone()
        value[0, 0] = float("nan")
        return value

    return {
        "unknown module name": (add_module, "names of no SD1.x layer"),
        "unknown tensor": (lambda sd, meta: sd.update({f"{te_q}.lora_mid.weight": torch.ones(4, 4, 3, 3)}),
                           "unknown tensors"),
        "missing alpha": (lambda sd, meta: sd.pop(f"{te_q}.alpha"), "missing alpha"),
        "zero alpha": (set_(f"{te_q}.alpha", torch.zeros_like), "alpha not a single number > 0"),
        "rank mismatch": (set_(f"{te_q}.lora_up.weight", lambda v: v[:, :-1].contiguous()), "rank mismatch"),
        "nan": (set_(f"{te_q}.lora_up.weight", nan), "NaN or Inf"),
        "inf": (set_(f"{te_q}.lora_down.weight", lambda v: v / 0), "NaN or Inf"),
        "short te names": (short_te, "text-encoder names without text_model_"),
        "2-D on a 1x1 conv": (flat_proj, "shapes that do not fit the layer"),
        "float64": (set_(f"{te_q}.lora_down.weight", lambda v: v.double()), "dtype other than"),
        "adapter metadata": (lambda sd, meta: meta.update(lora_adapter_metadata="{}"), "lora_adapter_metadata"),
        "bad json": (lambda sd, meta: meta.update(ss_tag_frequency="{'a': 1"), "malformed JSON"),
        "stale hash": (None, "stale sshs_model_hash"),
    }


MUTATIONS = _mutations()


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_verify_flags_each_defect(loras, tmp_path, case):
    from library.lora_tools.verify import verify_lora_file

    mutate, expected = MUTATIONS[case]
    sd = load_file(loras["a"])
    with safe_open(str(loras["a"]), "pt") as fh:
        meta = dict(fh.metadata())
    path = tmp_path / "broken.safetensors"
    if mutate is None:  # tensors changed after the hash was computed
        sd = {k: v * 2 if k.endswith("up.weight") else v for k, v in sd.items()}
        save_file(sd, str(path), meta)
    else:
        mutate(sd, meta)
        path.write_bytes(fmt.serialize_with_hashes(sd, meta))
    report = verify_lora_file(path)
    assert not report.ok
    assert [k for k in report.problems] == [k for k in report.problems if expected in k] != [], report.format()


def test_verify_passes_good_files_and_cli_exit_codes(loras, tmp_path, capsys):
    half = make_lora(tmp_path / "half.safetensors", 4, conv=True)
    from library.lora_tools.weights import write_lora

    write_lora(tmp_path / "bf16.safetensors", read_lora(half).modules.values(), torch.bfloat16, {})
    write_lora(tmp_path / "a.pt", read_lora(loras["a"]).modules.values(), torch.float16)
    good = [loras["a"], loras["b"], tmp_path / "bf16.safetensors", tmp_path / "a.pt"]
    assert check_lora_weights.main(["--verify", *map(str, good)]) == 0
    bad = tmp_path / "bad.safetensors"
    sd = load_file(loras["a"])
    sd.pop("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha")
    save_file(sd, str(bad))
    capsys.readouterr()
    assert check_lora_weights.main(["--verify", str(loras["a"]), str(bad)]) == 1
    printed = capsys.readouterr().out
    assert "a.safetensors: OK (264 modules)" in printed
    assert "missing alpha (clients disagree on the default): lora_te_text_model_encoder_layers_0_mlp_fc1" in printed

    assert check_lora_weights.main([str(loras["b"]), "-s"]) == 0
    shown = capsys.readouterr().out
    assert "  lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight  [4, 32, 3, 3]  float32  mean|x|" in shown
    assert "ss_network_dim: 4" in shown and "350 modules (72 text encoder, 278 U-Net); ranks 4; alphas 1, 2" in shown
    row = next(line for line in shown.splitlines() if line.startswith("lora_unet_down_blocks_0_resnets_0_conv1 "))
    assert row.split()[1:4] == ["4", "2", "float32"]


def test_saved_file_check_uses_the_models_sizes(loras, tmp_path):
    """train_network's self-check: layer sizes come from the trained model, and a failure names the file."""
    from library.lora_tools.verify import check_saved_lora

    unet, _, te = build_tiny_components(0)
    assert check_saved_lora(loras["b"], unet, te).ok
    sd = load_file(loras["a"])
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(8, 48)
    broken = tmp_path / "wrong_size.safetensors"
    broken.write_bytes(fmt.serialize_with_hashes(sd, {}))
    assert check_lora_weights.main(["--verify", str(broken)]) == 0  # without a model sizes are unknown
    with pytest.raises(UserError, match="wrong_size.safetensors, breaks the LoRA file contract: shapes that do not"):
        check_saved_lora(broken, unet, te)


# --- bad input -------------------------------------------------------------------------------

def test_bad_input_is_a_user_error_before_any_work(loras, tmp_path):
    a, out = str(loras["a"]), tmp_path / "out.safetensors"
    with pytest.raises(UserError, match="--ratios has 1 values for 2 files"):
        merge_lora.main(["--models", a, a, "--ratios", "0.5", "--save_to", str(out)])
    out.write_bytes(b"x")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        resize_lora.main(["--model", a, "--save_to", str(out)])
    resize_lora.main(["--model", a, "--save_to", str(out), "--overwrite", "--save_precision", "bf16"])
    assert {v.dtype for v in load_file(out).values()} == {torch.bfloat16}
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="asks for a CUDA GPU"):
            resize_lora.main(["--model", a, "--save_to", str(out), "--overwrite", "--device", "cuda"])
    with pytest.raises(UserError, match="unknown file type"):
        resize_lora.main(["--model", a, "--save_to", str(tmp_path / "out.bin")])
    with pytest.raises(SystemExit):  # argparse: out-of-range rank
        resize_lora.main(["--model", a, "--new_rank", "0", "--save_to", str(tmp_path / "r.safetensors")])
    with pytest.raises(UserError, match="sv_fro must be a share"):
        resize_lora.main(["--model", a, "--dynamic_method", "sv_fro", "--dynamic_param", "2",
                          "--save_to", str(tmp_path / "r.safetensors")])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="unknown weight file type"):
        resize_lora.main(["--model", str(tmp_path / "notes.txt"), "--save_to", str(tmp_path / "r.safetensors")])
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.hada_w1_a": torch.ones(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(UserError, match=f"{name} \\(loha\\) has no hada_w1_b"):  # an incomplete LoHa
        resize_lora.main(["--model", str(tmp_path / "loha.safetensors"), "--save_to", str(tmp_path / "r.safetensors")])


def test_reading_for_computation_is_strict(tmp_path):
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    down, up = torch.randn(4, 32), torch.randn(128, 4)
    cases = {"no_alpha": ({"lora_down.weight": down, "lora_up.weight": up}, None),
             "no_up": ({"lora_down.weight": down, "alpha": torch.tensor(1.0)}, "has no lora_up.weight"),
             "mismatch": ({"lora_down.weight": down, "lora_up.weight": up[:, :3].contiguous()}, "do not form a LoRA"),
             "nan": ({"lora_down.weight": down / 0, "lora_up.weight": up}, "NaN or Inf")}
    for case, (tensors, error) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_file({f"{name}.{k}": v for k, v in tensors.items()}, str(path))
        if error is None:
            assert read_lora(path).modules[name].alpha == 4.0  # missing alpha = rank, as sd-scripts reads it
        else:
            with pytest.raises(UserError, match=error):
                read_lora(path)


def test_pickled_lora_is_read_weights_only(loras, tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "evil.ckpt", "wb") as fh:
        pickle.dump({"lora_unet_x.alpha": Payload()}, fh, protocol=2)
    with pytest.raises(UserError, match="refusing to load"):
        merge_lora.main(["--models", str(tmp_path / "evil.ckpt"), "--save_to", str(tmp_path / "m.safetensors")])
    assert "must never run" not in capsys.readouterr().out
    torch.save(load_file(loras["a"]), tmp_path / "plain.ckpt")  # a plain tensor dict is fine
    merge_lora.main(["--models", str(tmp_path / "plain.ckpt"), "--save_to", str(tmp_path / "m.safetensors")])
    assert set(read_lora(tmp_path / "m.safetensors").modules) == set(read_lora(loras["a"]).modules)


def test_train_network_checks_every_file_it_writes(tiny_model, tmp_path, monkeypatch):
    from library.lora_tools import verify
    from tests.helpers import run_train_network, write_image_folder

    checked = []
    real = verify.check_saved_lora

    def recording(path, unet=None, text_encoder=None):
        checked.append((path, unet is not None and text_encoder is not None, real(path, unet, text_encoder).ok))
        return checked[-1]

    monkeypatch.setattr(verify, "check_saved_lora", recording)
    write_image_folder(tmp_path / "data", "1_sks disk", count=1, size=64)
    result = run_train_network([
        f"--pretrained_model_name_or_path={tiny_model.diffusers_dir}", f"--train_data_dir={tmp_path / 'data'}",
        f"--output_dir={tmp_path / 'out'}", "--resolution=64", "--network_dim=4", "--max_train_steps=2",
        "--save_every_n_steps=1", "--caption_extension=.txt", "--seed=1", "--cache_latents",
        "--save_precision=fp16", "--network_args", "conv_dim=2"])
    assert [c[0] for c in checked] == result["files"] and len(checked) == 2  # step 1, then the final file
    assert all(with_model and ok for _, with_model, ok in checked)
