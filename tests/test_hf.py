"""GPT-2 checkpoints in and out, checked by an independent oracle: transformers itself.

transformers' own ``GPT2LMHeadModel`` (PyTorch, CPU) computes the reference logits and
greedy tokens; mlxgpt's MLX model and its ONNX export (onnxruntime) must agree within
1e-4 and pick the same tokens, for

(a) random GPT-2s built by transformers (every parameter random, both activations),
    saved with ``save_pretrained`` and imported with ``mlxgpt import-hf``;
(b) mlxgpt-trained checkpoints (char + exact GELU + biases; BPE + tanh GELU + no biases)
    written by ``mlxgpt export-hf`` and loaded by ``from_pretrained``.

Bad inputs get one ``error:`` line and exit status 2, and nothing is written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

from mlxgpt.checkpoint import read_config, read_weights, resolve
from mlxgpt.cli import main
from mlxgpt.hf import export_hf, import_hf
from mlxgpt.sampling import DEFAULT_MAX_TOKENS, SamplingParams, from_generation_config
from mlxgpt.tokenizer import EOT

ATOL = 1e-4
GREEDY_TOKENS = 32
TEXT = "hello world, the quick brown fox jumps over the lazy dog. "

torch.set_num_threads(1)


# -- helpers ----------------------------------------------------------------------------------
def gpt2_style_tokenizer() -> HFTokenizer:
    """Byte-level BPE built locally, GPT-2's way: merges first, <|endoftext|> the last id."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([TEXT * 20], trainer=trainer)
    tok.add_special_tokens([EOT])
    return tok


def randomize(model: GPT2LMHeadModel, seed: int) -> None:
    """Every parameter random (biases and LayerNorms too), scaled so logits are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1:  # LayerNorm scale
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(noise)
            else:  # Conv1D (in, out)
                p.copy_(noise / p.shape[0] ** 0.5)


def hf_logits(model: GPT2LMHeadModel, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def mlx_logits(model, ids: list[int]) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([ids], dtype=mx.int32))[0])


def hf_greedy(model: GPT2LMHeadModel, ids: list[int], n: int, eos: int | None) -> list[int]:
    """transformers' greedy continuation, without the end token mlxgpt does not yield."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=0,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
        )
    tokens = out[0, len(ids) :].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


class Backends:
    """One model in three implementations: transformers (oracle), MLX, onnxruntime."""

    def __init__(self, hf: GPT2LMHeadModel, ckpt: Path, onnx_dir: Path):
        from mlxgpt.model_io import load_model
        from mlxgpt_export.exporter import export_checkpoint
        from mlxgpt_export.runtime import OnnxGPT

        self.hf = hf
        self.mlx, self.tokenizer, _ = load_model(ckpt)
        export_checkpoint(ckpt, onnx_dir, quiet=True)
        self.ort = OnnxGPT.load(onnx_dir)

    def check_logits(self, ids: list[int]) -> None:
        expected = hf_logits(self.hf, ids)
        np.testing.assert_allclose(mlx_logits(self.mlx, ids), expected, atol=ATOL, rtol=0)
        np.testing.assert_allclose(self.ort.forward([ids])[0][0], expected, atol=ATOL, rtol=0)

    def check_greedy(self, ids: list[int]) -> list[int]:
        from mlxgpt.generate import generate_tokens

        n = min(GREEDY_TOKENS, self.mlx.config.block_size - len(ids))  # HF cannot slide
        eos = self.tokenizer.eos_id
        expected = hf_greedy(self.hf, ids, n, eos)
        params = SamplingParams()
        assert list(generate_tokens(self.mlx, ids, n, params, stop_id=eos)) == expected
        assert list(self.ort.generate_ids(ids, n, params)) == expected
        return expected


def tensors_of(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "model.safetensors"))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- (a) a random GPT-2 from transformers, imported ------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    gpt2_style_tokenizer().save(str(path))
    return path


def make_hf_folder(folder: Path, tokenizer_file: Path, activation: str, seed: int = 0):
    vocab = HFTokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        activation_function=activation,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    return model


@pytest.fixture(scope="module", params=["gelu_new", "gelu"])
def imported(request, tokenizer_file, tmp_path_factory):
    """(HF folder, transformers model, imported checkpoint, the three backends)."""
    root = tmp_path_factory.mktemp(request.param)
    model = make_hf_folder(root / "hf", tokenizer_file, request.param)
    ckpt, _ = import_hf(root / "hf", root / "ckpt")
    return root / "hf", model, ckpt, Backends(model, ckpt, root / "onnx")


@pytest.fixture(scope="module")
def good_folder(tokenizer_file, tmp_path_factory) -> Path:
    """A valid HF folder that the bad-input tests copy and spoil."""
    folder = tmp_path_factory.mktemp("good") / "hf"
    make_hf_folder(folder, tokenizer_file, "gelu_new", seed=7)
    return folder


def test_imported_checkpoint_is_a_normal_checkpoint(imported):
    hf_dir, model, ckpt, backends = imported
    config = read_config(ckpt)
    expected_act = {"gelu_new": "gelu_tanh", "gelu": "gelu"}[model.config.activation_function]
    assert config.activation == expected_act
    assert (config.block_size, config.n_layer, config.n_head, config.n_embd) == (64, 2, 4, 32)
    assert backends.tokenizer.eos_id == backends.tokenizer.start_id == config.vocab_size - 1
    hf_tensors = tensors_of(hf_dir)
    weights = read_weights(ckpt, config)
    w = hf_tensors["transformer.h.1.mlp.c_fc.weight"]  # Conv1D (in, out)
    np.testing.assert_array_equal(weights["h.1.mlp.c_fc.weight"], w.T)


def test_imported_logits_match_transformers(imported):
    *_, backends = imported
    ids = np.random.default_rng(0).integers(0, backends.tokenizer.vocab_size, 64).tolist()
    backends.check_logits(ids)  # every position of the full window


def test_imported_greedy_tokens_match_transformers(imported):
    *_, backends = imported
    tokens = backends.check_greedy(backends.tokenizer.encode("the quick brown"))
    assert len(tokens) >= 8  # long enough to mean something


def test_round_trip_hf_mlxgpt_hf_gives_the_same_tensors(imported, tmp_path):
    hf_dir, model, ckpt, _ = imported
    out = export_hf(ckpt, tmp_path / "hf")
    original, back = tensors_of(hf_dir), tensors_of(out)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(back[name], tensor, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == model.config.activation_function


def hub_layout(src: Path, dst: Path, n_positions: int = 64) -> None:
    """The layout of the hub's original gpt2 files: bare names, mask buffers, lm_head."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(2):
        mask = np.tril(np.ones((n_positions, n_positions), np.float32))
        bare[f"h.{i}.attn.bias"] = mask[None, None]
        bare[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    bare["lm_head.weight"] = bare["wte.weight"].copy()
    save_file(bare, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_hub_layout_imports_to_the_same_checkpoint(imported, tmp_path, capsys):
    hf_dir, _, ckpt, _ = imported
    hub_layout(hf_dir, tmp_path / "hub")
    code, out, err = run(capsys, "import-hf", tmp_path / "hub", tmp_path / "ckpt")
    assert code == 0, err
    assert "imported" in out and "2 layers" in out
    a, b = tensors_of(ckpt), tensors_of(tmp_path / "ckpt")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_sharded_float16_folder_imports(tokenizer_file, tmp_path):
    model = make_hf_folder(tmp_path / "f32", tokenizer_file, "gelu_new", seed=3)
    model.half().save_pretrained(tmp_path / "f16", max_shard_size="40KB")
    shutil.copyfile(tokenizer_file, tmp_path / "f16" / "tokenizer.json")
    assert (tmp_path / "f16" / "model.safetensors.index.json").is_file()
    ckpt, config = import_hf(tmp_path / "f16", tmp_path / "ckpt")
    weights = read_weights(ckpt, config)
    wte = model.transformer.wte.weight.detach().float().numpy()
    np.testing.assert_array_equal(weights["wte.weight"], wte)


@pytest.mark.parametrize("setting", ["gelu_pytorch_tanh", "reorder_and_upcast_attn"])
def test_equivalent_settings_are_accepted(setting, tokenizer_file, tmp_path):
    """``gelu_pytorch_tanh`` is GPT-2's tanh GELU; ``reorder_and_upcast_attn`` only reorders."""
    make_hf_folder(tmp_path / "hf", tokenizer_file, "gelu_new", seed=5)
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    if setting == "gelu_pytorch_tanh":
        config["activation_function"] = "gelu_pytorch_tanh"
    else:
        config["reorder_and_upcast_attn"] = True
    path.write_text(json.dumps(config))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ckpt, mlx_config = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert mlx_config.activation == "gelu_tanh"
    from mlxgpt.model_io import load_model

    model, tokenizer, _ = load_model(ckpt)
    ids = tokenizer.encode(TEXT)[:64]
    np.testing.assert_allclose(mlx_logits(model, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_imported_checkpoint_generates_and_exports(imported, tmp_path, capsys):
    *_, ckpt, _ = imported
    code, out, err = run(capsys, "generate", ckpt, "--prompt", "the quick", "--max-tokens", "5")
    assert code == 0 and out.startswith("the quick"), err
    code, out, err = run(capsys, "export", ckpt, tmp_path / "onnx", "--no-verify")
    assert code == 0 and (tmp_path / "onnx" / "onnx" / "model.onnx").is_file(), err


# -- (b) mlxgpt-trained checkpoints, exported -------------------------------------------------
@pytest.fixture(scope="module")
def bpe_ckpt(corpus_file, tmp_path_factory) -> Path:
    """A BPE, tanh-GELU, bias-free checkpoint (the other trained_ckpt has the opposites)."""
    from conftest import tiny_train_config

    from mlxgpt.train import train

    out = tmp_path_factory.mktemp("bpe")
    model = {"block_size": 64, "activation": "gelu_tanh", "bias": False}
    cfg = tiny_train_config(corpus_file, out, tokenizer="bpe", bpe_vocab_size=300, model=model)
    return Path(train(cfg, progress=False, quiet=True).ckpt)


@pytest.fixture(scope="module", params=["char-gelu-bias", "bpe-gelutanh-nobias"])
def exported(request, tmp_path_factory):
    """(mlxgpt checkpoint, export-hf folder, the three backends)."""
    name = "trained_ckpt" if request.param.startswith("char") else "bpe_ckpt"
    ckpt = resolve(request.getfixturevalue(name))
    root = tmp_path_factory.mktemp(request.param)
    out = export_hf(ckpt, root / "hf")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    return ckpt, out, Backends(hf, ckpt, root / "onnx")


def test_exported_logits_match_transformers(exported):
    *_, backends = exported
    n = backends.mlx.config.block_size
    ids = np.random.default_rng(1).integers(0, backends.tokenizer.vocab_size, n).tolist()
    backends.check_logits(ids)


def test_exported_greedy_tokens_match_transformers(exported):
    *_, backends = exported
    tokens = backends.check_greedy(backends.tokenizer.encode("All:\n"))
    assert len(tokens) >= 8


def test_exported_config_and_generation_config_mean_what_mlxgpt_means(exported):
    ckpt, out, backends = exported
    tokenizer, config = backends.tokenizer, read_config(ckpt)
    hf = backends.hf.config
    assert hf.model_type == "gpt2" and hf.architectures == ["GPT2LMHeadModel"]
    assert hf.n_positions == config.block_size and hf.vocab_size == config.vocab_size
    assert hf.bos_token_id == tokenizer.start_id
    assert hf.eos_token_id == tokenizer.eos_id  # None for char models, not GPT-2's 50256
    assert backends.hf.dtype == torch.float32
    generation = GenerationConfig.from_pretrained(out)
    assert generation.do_sample is False and generation.max_new_tokens == DEFAULT_MAX_TOKENS
    assert generation.bos_token_id == tokenizer.start_id
    assert generation.eos_token_id == tokenizer.eos_id
    values = json.loads((out / "generation_config.json").read_text())
    assert from_generation_config(values) == (SamplingParams(), DEFAULT_MAX_TOKENS)


def test_auto_tokenizer_gives_mlxgpt_ids_and_text(exported, corpus_file):
    _, out, backends = exported
    tokenizer = backends.tokenizer
    auto = AutoTokenizer.from_pretrained(out)
    text = corpus_file.read_text()[:300] + " . , ?"
    ids = tokenizer.encode(text)
    assert auto(text)["input_ids"] == ids
    assert auto.decode(ids) == tokenizer.decode(ids) == text
    assert auto.eos_token_id == tokenizer.eos_id
    assert auto.model_max_length == backends.mlx.config.block_size


def test_round_trip_mlxgpt_hf_mlxgpt(exported, tmp_path):
    ckpt, out, _ = exported
    back, config = import_hf(out, tmp_path / "back")
    original_config = read_config(ckpt)
    assert config.activation == original_config.activation
    original, weights = read_weights(ckpt, original_config), read_weights(back, config)
    for name, w in weights.items():
        expected = original.get(name, np.zeros_like(w))  # bias=False: zero biases
        np.testing.assert_array_equal(w, expected, err_msg=name)
    assert (back / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()


def test_export_hf_from_the_command_line(trained_ckpt, tmp_path, capsys):
    code, out, err = run(capsys, "export-hf", trained_ckpt.parent, tmp_path / "hf")
    assert code == 0, err
    assert "exported" in out
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


WITHOUT_MLX_AND_TORCH = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlx", "torch", "transformers"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, Block())
from mlxgpt.cli import main

hf_dir, ckpt, out = sys.argv[1:]
codes = [main(["import-hf", hf_dir, ckpt]), main(["export-hf", ckpt, out])]
blocked = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "torch", "transformers"))
print(codes, blocked)
"""


def test_import_and_export_need_neither_mlx_nor_torch(good_folder, tmp_path):
    """mlxgpt.hf is numpy-only: it runs where MLX (and torch) cannot be imported."""
    args = [good_folder, tmp_path / "ckpt", tmp_path / "hf"]
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_MLX_AND_TORCH, *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[0, 0] []"
    original, back = tensors_of(good_folder), tensors_of(tmp_path / "hf")
    assert sorted(back) == sorted(original)
    assert all(np.array_equal(back[k], original[k]) for k in original)


# -- bad inputs: one error line, exit status 2, nothing written -------------------------------
def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(folder: Path, edit) -> None:
    tensors = tensors_of(folder)
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def drop_tensor(tensors):
    del tensors["transformer.h.1.mlp.c_fc.weight"]


def short_wpe(tensors):
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:32].copy()


def untied_head(tensors):
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0


def nan_weight(tensors):
    tensors["transformer.wte.weight"][3, 5] = np.nan


def extra_tensor(tensors):
    tensors["score.weight"] = np.zeros((2, 32), np.float32)  # a classification head


def no_end_of_text(folder: Path):
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["added_tokens"] = []
    path.write_text(json.dumps(data))


def bin_only(folder: Path):
    state = {k: torch.from_numpy(v) for k, v in tensors_of(folder).items()}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def bfloat16(folder: Path):
    from safetensors.torch import load_file as torch_load
    from safetensors.torch import save_file as torch_save

    tensors = {k: v.bfloat16() for k, v in torch_load(str(folder / "model.safetensors")).items()}
    torch_save(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def truncated(folder: Path):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def small_tokenizer(folder: Path):
    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens(["extra"])
    tok.save(str(folder / "tokenizer.json"))


BAD_FOLDERS = {
    "llama": (lambda f: edit_config(f, model_type="llama"), ["llama", "gpt2"]),
    "relu": (lambda f: edit_config(f, activation_function="relu"), ["activation_function"]),
    "eps": (lambda f: edit_config(f, layer_norm_epsilon=1e-6), ["layer_norm_epsilon"]),
    "n_inner": (lambda f: edit_config(f, n_inner=64), ["n_inner"]),
    "by_layer": (
        lambda f: edit_config(f, scale_attn_by_inverse_layer_idx=True),
        ["scale_attn_by_inverse_layer_idx"],
    ),
    "unscaled": (lambda f: edit_config(f, scale_attn_weights=False), ["scale_attn_weights"]),
    "untied_flag": (lambda f: edit_config(f, tie_word_embeddings=False), ["lm_head"]),
    "missing_weight": (lambda f: edit_tensors(f, drop_tensor), ["h.1.mlp.c_fc.weight"]),
    "shape": (lambda f: edit_tensors(f, short_wpe), ["wpe.weight", "(64, 32)"]),
    "untied_head": (lambda f: edit_tensors(f, untied_head), ["untied"]),
    "nan": (lambda f: edit_tensors(f, nan_weight), ["wte.weight", "NaN"]),
    "extra_tensor": (lambda f: edit_tensors(f, extra_tensor), ["unexpected ['score.weight']"]),
    "cross_attention": (lambda f: edit_config(f, add_cross_attention=True), ["cross"]),
    "bin_only": (bin_only, ["pytorch_model.bin", "save_pretrained"]),
    "bfloat16": (bfloat16, ["BF16", "float()"]),
    "truncated": (truncated, ["corrupt"]),
    "no_tokenizer": (lambda f: (f / "tokenizer.json").unlink(), ["tokenizer.json"]),
    "tokenizer_size": (small_tokenizer, ["vocab_size"]),
    "no_end_of_text": (no_end_of_text, [EOT]),
    "no_config": (lambda f: (f / "config.json").unlink(), ["config.json"]),
    "no_folder": (shutil.rmtree, ["not a folder"]),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_hf_folders_are_refused(case, good_folder, tmp_path, capsys):
    spoil, words = BAD_FOLDERS[case]
    folder = tmp_path / "hf"
    shutil.copytree(good_folder, folder)
    spoil(folder)
    code, out, err = run(capsys, "import-hf", folder, tmp_path / "out")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


@pytest.mark.parametrize("command", ["import-hf", "export-hf"])
def test_an_existing_out_is_never_replaced(command, good_folder, trained_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's file")
    source = good_folder if command == "import-hf" else trained_ckpt
    code, _, err = run(capsys, command, source, out)
    assert code == 2 and err.startswith("error: ") and "already exists" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_an_empty_out_folder_is_used(good_folder, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, _, err = run(capsys, "import-hf", good_folder, tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_imported_gpt2_fine_tunes_and_goes_back_to_transformers(imported, tmp_path, capsys):
    """The round trip a user makes: HF folder -> import-hf -> train --init-from on their own
    text -> export-hf -> transformers, whose logits equal the fine-tuned MLX model's."""
    from mlxgpt.model_io import load_model

    *_, ckpt, _ = imported
    corpus = tmp_path / "mine.txt"
    corpus.write_text(TEXT * 200, encoding="utf-8")
    args = ["train", "--init-from", ckpt, "--data", corpus, "--out-dir", tmp_path / "tuned"]
    args += ["--no-progress", "max_iters=12", "batch_size=4", "learning_rate=3e-3"]
    args += ["warmup_iters=0", "eval_interval=12", "eval_iters=1", "sample_tokens=0"]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "tuned/log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0]
    code, _, err = run(capsys, "export-hf", tmp_path / "tuned", tmp_path / "hf-tuned")
    assert code == 0, err
    tuned, _, _ = load_model(tmp_path / "tuned")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf-tuned").eval()
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf-tuned")(TEXT)["input_ids"][:48]
    np.testing.assert_allclose(mlx_logits(tuned, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)
    assert not np.allclose(hf_logits(hf, ids), hf_logits(imported[1], ids), atol=1e-3)
