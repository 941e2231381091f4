"""Hugging Face causal language models (``hf:<folder>``): tiny GPT-2, Llama and GPT-NeoX models built from
configs and saved locally with a tokenizer trained here (nothing is downloaded); their residual sites, the
head, the twin, the text data through their own tokenizer, errors, and a run of every plugin."""

import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import resinspect  # noqa: E402
from resinspect import ResinspectError  # noqa: E402
from resinspect.anatomy import bypass, residual_blocks  # noqa: E402
from resinspect.data.tokens import load_text  # noqa: E402
from resinspect.models import build_model  # noqa: E402
from resinspect.models.hf import HF_HINT, load_hf  # noqa: E402
from resinspect.models.registry import remove_skips  # noqa: E402
from resinspect.probes import hooks_left  # noqa: E402
from resinspect.readout import find_head  # noqa: E402

WORDS = "the residual stream carries every layer's output to the next and the head reads its end".split()


def _text(n_words: int = 1500) -> str:
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in picks)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_text()], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _config(family: str, vocab: int):
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0}
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **common)
    if family == "llama":
        return transformers.LlamaConfig(
            num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, **common,
        )  # fmt: skip
    return transformers.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=64,
        use_parallel_residual=family == "neox-parallel", **common,
    )  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{family: folder}``: each model saved with save_pretrained next to the same tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("hf")
    tok = _tokenizer()
    folders = {}
    for family in ("gpt2", "llama", "neox", "neox-parallel"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(family, len(tok)))
        folders[family] = root / family
        model.save_pretrained(folders[family])
        tok.save_pretrained(folders[family])
    (root / "words.txt").write_text(_text())
    folders["text"] = root / "words.txt"
    return folders


def _reference(folder):
    """The same model as transformers itself runs it, untouched by resinspect."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize(
    "family, layers, kinds",
    [
        ("gpt2", 2, ["attention", "mlp"]),
        ("llama", 3, ["attention", "mlp"]),
        ("neox", 2, ["attention", "mlp"]),
        ("neox-parallel", 2, ["attention+mlp"]),
    ],
)
def test_sites_are_found_in_each_family_and_the_outputs_are_unchanged(saved, family, layers, kinds):
    model = load_hf(str(saved[family])).eval()
    blocks = residual_blocks(model)
    assert [b.kind for b in blocks] == kinds * layers  # 2 x layers sites (one per parallel layer)
    assert not blocks.untraced  # the levels above the layers are not reported as untraced
    assert model.sites == [len(kinds)] * layers and not model.unsupported
    ids = torch.randint(0, model.vocab, (3, 11))  # another length than the call the layers were traced for
    with torch.no_grad():
        assert torch.equal(model(ids), _reference(saved[family])(input_ids=ids, use_cache=False).logits)


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox-parallel"])
def test_the_head_reads_the_last_site_as_the_logits(saved, family):
    model = load_hf(str(saved[family])).eval()
    blocks = residual_blocks(model)
    streams = []
    blocks[-1].module.register_forward_hook(lambda m, a, out: streams.append(out))
    ids = torch.randint(0, model.vocab, (2, 9))
    with torch.no_grad():
        logits = model(ids)
        head = find_head(model, blocks[-1].layer)
        assert torch.allclose(head(streams[0]), logits, atol=1e-5)


def test_bypassing_every_site_leaves_the_embedding_read_by_the_head(saved):
    """Closed form for GPT-2: with no branch computed, the logits are lm_head(ln_f(wte(ids) + wpe(positions)))."""
    model = load_hf(str(saved["gpt2"])).eval()
    gpt = model.hf.transformer
    ids = torch.randint(0, model.vocab, (2, 7))
    with torch.no_grad(), bypass(model, residual_blocks(model)):
        got = model(ids)
    with torch.no_grad():
        expected = model.hf.lm_head(gpt.ln_f(gpt.wte(ids) + gpt.wpe(torch.arange(7))))
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(model(ids), expected, atol=1e-3)  # the branches do matter when computed


def test_the_plain_twin_layer_is_its_branches_without_the_stream(saved):
    twin = remove_skips(load_hf(str(saved["gpt2"]))).eval()
    layer = twin.hf.transformer.h[0]
    seen = {}
    layer.attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out[0]))
    layer.ln_2.register_forward_hook(lambda m, a, out: seen.__setitem__("ln_2 input", a[0]))
    layer.mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("mlp", out))
    layer.register_forward_hook(lambda m, a, out: seen.__setitem__("layer", out))
    with torch.no_grad():
        twin(torch.randint(0, twin.vocab, (2, 8)))
    assert torch.equal(seen["ln_2 input"], seen["attn"])  # the MLP reads the attention's output alone
    assert torch.equal(seen["layer"], seen["mlp"])  # and the layer returns the MLP's output alone
    assert not residual_blocks(twin)


def test_a_call_the_sites_cannot_follow_is_refused(saved):
    model = load_hf(str(saved["gpt2"])).eval()
    layer = model.hf.transformer.h[0]
    with pytest.raises(RuntimeError, match="cannot follow"):
        layer(torch.zeros(1, 4, 32), use_cache=True, encoder_attention_mask=None)


def test_text_is_cut_by_the_models_own_tokenizer_and_a_run_analyses_it(saved, tmp_path):
    from resinspect.plugins import discover_entry_points

    plugins = sorted(name for name, info in discover_entry_points().items() if info.load_error is None)
    result = resinspect.run(
        model=f"hf:{saved['gpt2']}",
        data="text",
        data_root=str(saved["text"]),
        data_args={"length": 16},
        plugins=plugins,
        twin=True,
        samples=32,
        out=str(tmp_path / "run"),
    )
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(saved["gpt2"], local_files_only=True)
    assert doc["data"]["tokenizer"] == str(saved["gpt2"])
    assert doc["data"]["vocab"] == doc["data"]["num_classes"] == len(tok) > 256  # its tokens, not bytes
    assert doc["data"]["tokens"] == len(tok(saved["text"].read_text())["input_ids"])
    assert doc["training"] == {}  # a Hugging Face model is analysed as it was loaded: no epochs
    statuses = {name: p["status"] for name, p in doc["plugins"].items()}
    assert set(statuses.values()) <= {"ok", "skipped"}, statuses
    assert statuses["lens"] == "ok" and statuses["ablation"] == "ok"
    # every analysis cleaned up: the layers' chained forwards are the anatomy's, not a patch left behind
    assert not hooks_left(result.model) and not hooks_left(result.twin)
    assert residual_blocks(result.model) and not residual_blocks(result.twin)


def test_errors_name_what_is_missing(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ResinspectError, match="no such folder"):
        build_model(f"hf:{tmp_path / 'nowhere'}")
    (tmp_path / "bare").mkdir()
    with pytest.raises(ResinspectError, match="no config.json"):
        build_model(f"hf:{tmp_path / 'bare'}")
    with pytest.raises(ResinspectError, match="holds no tokenizer"):
        load_text(str(saved["text"]), tokenizer=str(tmp_path / "bare"))
    with pytest.raises(ResinspectError, match="local Hugging Face cache") as e:
        build_model("hf:someone/not-cached-model")
    assert "\n" not in str(e.value)
    with pytest.raises(ResinspectError, match=r"vocabulary of \d+ tokens; the data's has 100000"):
        build_model(f"hf:{saved['gpt2']}", num_classes=100000)
    with pytest.raises(ResinspectError, match="at most 64 positions"):
        build_model(f"hf:{saved['gpt2']}", num_classes=64, image_size=128)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ResinspectError) as e:
        build_model(f"hf:{saved['gpt2']}")
    assert str(e.value) == HF_HINT


def test_heads_reads_and_silences_the_attention_of_a_hugging_face_model(saved):
    from resinspect_plugins._heads import attention_modules, head_count
    from resinspect_plugins.heads import _patterns, _silenced

    model = load_hf(str(saved["gpt2"])).eval()
    modules = attention_modules(model)
    assert [n for n, _ in modules] == ["hf.transformer.h.0.attn", "hf.transformer.h.1.attn"]
    assert [head_count(m) for _, m in modules] == [4, 4]
    ids = torch.randint(0, model.vocab, (2, 9))
    with torch.no_grad():
        with _patterns(modules) as patterns_of:
            model(ids)
            got = patterns_of()
        theirs = model.hf(input_ids=ids, use_cache=False, output_attentions=True).attentions
        for mine, reference in zip(got, theirs):
            assert torch.allclose(mine, reference)  # the patterns transformers itself reports
        # every head silenced: the attention's output is its projection's bias alone, at every position
        attn = modules[0][1]
        outs = []
        attn.register_forward_hook(lambda m, a, out: outs.append(out[0]))
        with _silenced(attn, torch.zeros(4)):
            model(ids)
        assert torch.allclose(outs[0], attn.c_proj.bias.expand_as(outs[0]))
        # one head silenced: the projection reads its input without that head's 8 columns
        seen = []
        attn.c_proj.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
        with _silenced(attn, torch.tensor([1.0, 0.0, 1.0, 1.0])):
            model(ids)
        heads_in, out = seen[0]
        kept = heads_in.clone()
        kept[..., 8:16] = 0
        assert torch.allclose(out, kept @ attn.c_proj.weight + attn.c_proj.bias, atol=1e-6)  # Conv1D: x W + b
        assert not torch.allclose(out, heads_in @ attn.c_proj.weight + attn.c_proj.bias, atol=1e-4)
    # the masked forward was put back afterwards
    assert "forward" not in attn.c_proj.__dict__


def test_transformers_is_imported_only_for_an_hf_model():
    import subprocess

    code = (
        "import sys, resinspect, resinspect.cli, resinspect.runner\n"
        "from resinspect.models import build_model\n"
        "build_model('gpt-tiny-2', 1, 64, 16)\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_fine_tuned_model_reloads_from_its_checkpoint(saved, tmp_path):
    from resinspect.models import load_checkpoint

    result = resinspect.run(
        model=f"hf:{saved['gpt2']}",
        data="text",
        data_root=str(saved["text"]),
        data_args={"length": 16},
        plugins=["summary"],
        epochs=1,
        out=str(tmp_path / "run"),
    )
    loaded, payload = load_checkpoint(tmp_path / "run" / "model.pt")
    assert payload["arch"] == f"hf:{saved['gpt2']}"
    ids = torch.randint(0, loaded.vocab, (2, 16))
    with torch.no_grad():
        tuned = result.model.eval()(ids)
        assert torch.equal(loaded.eval()(ids), tuned)
        assert not torch.allclose(load_hf(str(saved["gpt2"])).eval()(ids), tuned)  # one epoch changed it


def test_gpt2_conv1d_matrices_count_as_linear_layers_for_weights_and_spectra(saved):
    from resinspect_plugins._spectra import spectrum
    from resinspect_plugins.spectra import layers_of
    from resinspect_plugins.weights import layer_weights

    from resinspect import is_linear, linear_weight

    model = load_hf(str(saved["gpt2"]))
    names = [n for n, _ in layers_of(model)]
    for i in range(2):  # every attention and MLP matrix of each layer, then the unembedding
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert f"hf.transformer.h.{i}.{part}" in names
    assert names[-1] == "hf.lm_head"
    assert len(layer_weights(model)) == len(names)
    c_fc = model.hf.transformer.h[0].mlp.c_fc  # transformers' Conv1D: x @ W + b, W stored (in=32, out=128)
    linear = torch.nn.Linear(32, 128)
    with torch.no_grad():
        linear.weight.copy_(c_fc.weight.t())
        linear.bias.copy_(c_fc.bias)
        x = torch.randn(5, 32)
        assert torch.allclose(linear(x), c_fc(x), atol=1e-6)
    assert is_linear(c_fc) and torch.equal(linear_weight(c_fc), linear.weight)
    ours, _ = spectrum("c_fc", linear_weight(c_fc).detach())
    reference, _ = spectrum("linear", linear.weight.detach())
    assert ours is not None and reference is not None
    assert (ours.N, ours.M) == (reference.N, reference.M) == (128, 32)
    assert torch.allclose(torch.as_tensor(ours.evals), torch.as_tensor(reference.evals))
