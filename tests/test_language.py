"""Language models: the next-token task, the induction and text data, gpt-tiny / attn-only-2 and their sites,
the heads scores in closed form, and the contract of every plugin on a small GPT."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import resinspect
from resinspect import CLASSIFICATION, NEXT_TOKEN, ResinspectError, cross_entropy
from resinspect.anatomy import residual_blocks
from resinspect.data import load_data
from resinspect.data.tokens import load_induction, repeat_start
from resinspect.errors import DataError
from resinspect.models import build_model
from resinspect.models.registry import plain_twin_of
from resinspect.readout import find_head
from resinspect.training import evaluate
from resinspect_plugins._heads import induction_score, previous_token_score, repeated_tokens


class Uniform(torch.nn.Module):
    """Outputs zero logits over ``vocab`` at every position: the uniform distribution."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.vocab) * self.w


def test_uniform_logits_give_log_v_loss_and_perplexity_v():
    v, t = 16, 16  # T == V: F.cross_entropy on (B, T, V) would silently read T as the classes
    x = torch.randint(0, v, (8, t))
    y = torch.randint(0, v, (8, t))
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    got = evaluate(Uniform(v), loader, torch.device("cpu"), task=NEXT_TOKEN)
    assert got["loss"] == pytest.approx(math.log(v), rel=1e-6)
    assert got["perplexity"] == pytest.approx(v, rel=1e-5)
    # every logit ties: argmax picks token 0, so accuracy is the share of targets that are 0
    assert got["accuracy"] == pytest.approx(float((y == 0).float().mean()))


def test_cross_entropy_is_per_prediction_for_both_tasks():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 5)
    y = torch.randint(0, 5, (4, 5))
    by_hand = -torch.log_softmax(logits, -1).gather(-1, y[..., None]).squeeze(-1)
    assert torch.allclose(cross_entropy(logits, y, "none"), by_hand)
    assert torch.allclose(NEXT_TOKEN.loss(logits, y), by_hand.mean())
    assert torch.allclose(NEXT_TOKEN.loss(logits, y, "none"), by_hand.mean(1))  # one value per sequence
    assert int(NEXT_TOKEN.correct(logits, y)) == int((logits.argmax(-1) == y).sum())
    assert NEXT_TOKEN.predictions(y) == 20
    flat = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.allclose(CLASSIFICATION.loss(flat, labels), torch.nn.functional.cross_entropy(flat, labels))
    with pytest.raises(ResinspectError, match="next-token logits"):
        NEXT_TOKEN.check(flat, y)


def test_induction_data_repeats_exactly():
    b = load_induction(vocab=32, length=20, train=50, test=40, seed=3)
    assert b.task == "next-token" and b.num_classes == 32 and b.image_size == 20
    x, y = b.test.tensors
    assert x.shape == y.shape == (40, 20)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    seq = torch.cat([x, y[:, -1:]], 1)
    periods = b.info["test_periods"]
    assert len(set(periods)) > 1 and all(5 <= p <= repeat_start(20) for p in periods)
    for s, p in zip(seq, periods):
        assert torch.equal(s[p:], s[: len(s) - p])
    half = load_induction(vocab=32, length=20, train=5, test=5, period=repeat_start(20))
    x, y = half.train.tensors
    seq = torch.cat([x, y[:, -1:]], 1)
    h = repeat_start(20)
    assert torch.equal(seq[:, h:], seq[:, : 21 - h])  # the second half repeats the first
    with pytest.raises(DataError, match="period"):
        load_induction(length=20, period=30)


def test_text_data_is_bytes_split_by_position(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(1000))
    f = tmp_path / "a.txt"
    f.write_text(text, encoding="utf-8")
    b = load_data("text", root=str(f), length=9, test_fraction=0.2)
    x, y = b.train.tensors
    assert b.num_classes == 256 and x.shape[1] == 9
    assert len(x) == 800 // 10 and len(b.test.tensors[0]) == 200 // 10
    assert bytes(x[0].tolist()) == text[:9].encode() and bytes(y[0].tolist()) == text[1:10].encode()
    assert bytes(b.test.tensors[0][0].tolist()) == text[800:809].encode()
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "one.txt").write_text(text, encoding="utf-8")
    (folder / "two.txt").write_text(text, encoding="utf-8")
    assert load_data("text", root=str(folder), length=9).info["files"] == 2
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfe" * 100)
    with pytest.raises(DataError, match="bad.txt is not UTF-8"):
        load_data("text", root=str(bad))
    with pytest.raises(DataError, match="does not exist"):
        load_data("text", root=str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="too few"):
        load_data("text", root=str(f), length=500)


def test_sites_and_head_of_the_builtin_language_models():
    torch.manual_seed(0)
    gpt = build_model("gpt-tiny", 1, 50, 12).eval()
    blocks = residual_blocks(gpt)
    assert [b.kind for b in blocks] == ["attention", "mlp"] * 4
    assert [b.name for b in blocks[:2]] == ["layers.0.attention", "layers.0.mlp"]
    tokens = torch.randint(0, 50, (3, 12))
    streams = {}
    handle = gpt.layers[3].register_forward_hook(lambda m, i, o: streams.setdefault("last", o))
    with torch.no_grad():
        out = gpt(tokens)
        handle.remove()
        head = find_head(gpt, blocks[-1].layer)
        assert torch.equal(head(streams["last"]), out)  # the head is the final norm and the unembedding
    assert {n for n, _ in head.named_children()} == {"norm", "unembed"}
    attn = build_model("attn-only-2", 1, 50, 12)
    assert [b.kind for b in residual_blocks(attn)] == ["attention", "attention"]
    twin = plain_twin_of("attn-only-2", 1, 50, 12)
    assert residual_blocks(twin) == []
    with torch.no_grad():  # the twin is the model without the additions: x = attn(ln(x))
        x = twin.embed(tokens)
        for layer in twin.layers:
            x = layer.attn(layer.ln1(x))
        assert torch.allclose(twin(tokens), twin.unembed(twin.norm(x)), atol=1e-6)
        x = attn.embed(tokens)
        for layer in attn.layers:
            x = x + layer.attn(layer.ln1(x))
        assert torch.allclose(attn(tokens), attn.unembed(attn.norm(x)), atol=1e-6)


def test_head_scores_in_closed_form():
    t, p = 10, 4
    induction = torch.zeros(1, 2, t, t)
    previous = torch.zeros(1, 2, t, t)
    for q in range(t):
        previous[0, :, q, max(q - 1, 0)] = 1
        induction[0, :, q, q - p + 1 if q >= p else q] = 1
    assert torch.allclose(induction_score(induction, p), torch.ones(2))
    assert torch.allclose(previous_token_score(previous), torch.ones(2))
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    uniform = uniform.expand(3, 2, t, t)
    expected = sum(1 / (q + 1) for q in range(p, t)) / (t - p)
    assert torch.allclose(induction_score(uniform, p), torch.full((2,), expected))
    assert float(induction_score(uniform, p)[0]) < 0.2
    tokens, period = repeated_tokens(4, 13, 7, seed=0)
    assert period == 6 and torch.equal(tokens[:, period:], tokens[:, : 13 - period])


def test_an_image_model_on_token_data_is_one_clear_error(tmp_path):
    with pytest.raises(ResinspectError, match="needs a language model"):
        resinspect.run(model="resnet8", data="induction", epochs=0, plugins=["weights"], out=tmp_path / "a")
    with pytest.raises(ResinspectError, match="need next-token data"):
        resinspect.run(model="gpt-tiny-2", data="digits", epochs=0, plugins=["weights"], out=tmp_path / "b")


def test_layer_deletion_and_swap_are_the_forward_with_layers_removed_or_reordered():
    """Lad et al.'s lesions: deleting a layer bypasses all its sites, a swap runs the two layers in the other
    order; both checked against the forward written out by hand, and the model restored afterwards."""
    from resinspect import bypass
    from resinspect_plugins._layers import layer_groups, layered, swap_sweep, swapped

    torch.manual_seed(0)
    gpt = build_model("gpt-tiny", 1, 20, 10).eval()
    blocks = residual_blocks(gpt)
    groups = layer_groups(blocks)
    assert [g for g, _ in groups] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert all(len(idx) == 2 for _, idx in groups) and layered(blocks, language=False)
    tokens = torch.randint(0, 20, (4, 10))
    with torch.no_grad():
        clean = gpt(tokens)

        def by_hand(order):
            x = gpt.embed(tokens)
            for i in order:
                x = gpt.layers[i](x)
            return gpt.unembed(gpt.norm(x))

        reordered, deleted = by_hand([0, 2, 1, 3]), by_hand([1, 2, 3])  # computed outside the switches
        with swapped(gpt, "layers.1", "layers.2"):
            assert torch.allclose(gpt(tokens), reordered, atol=1e-6)
        with bypass(gpt, [blocks[i] for i in groups[0][1]]):
            assert torch.allclose(gpt(tokens), deleted, atol=1e-6)
        assert torch.equal(gpt(tokens), clean)  # restored
        y = torch.randint(0, 20, (4, 10))
        (stats,) = swap_sweep(gpt, [(tokens, y)], [("layers.1", "layers.2")])
        swapped_out = reordered
        assert stats.count == 40 and stats.correct == int((swapped_out.argmax(-1) == y).sum())
        assert stats.loss == pytest.approx(float(cross_entropy(swapped_out, y)), rel=1e-5)


def test_lens_and_heads_on_a_small_gpt(tmp_path):
    """lens reads a GPT's stream through its final norm and unembedding: at the last site the reading is the
    model's own output (KL 0), per position too; fitted on at most fit_tokens tokens. heads scores every head."""
    data = load_induction(vocab=16, length=12, train=128, test=32)
    result = resinspect.run(
        model="gpt-tiny-2", data=data, epochs=1, twin=True, plugins=["lens", "heads"], out=tmp_path / "run",
        options={"lens": {"fit_samples": 64, "fit_tokens": 60, "steps": 3}, "heads": {"sequences": 8}},
    )
    lens = result.section("lens")
    m = lens.metrics
    assert m["model/logit/kl/layers.1.mlp"] == pytest.approx(0.0, abs=1e-9)
    assert m["model/logit/kl/input"] > 0.0
    assert any("fitted on 5 training sequences" in t.title for t in lens.tables)  # ceil(60 / 12) sequences
    assert [f.title for f in lens.figures][-1] == "Logit-lens KL by stream point and position"
    heads = result.section("heads")
    assert heads.status == "ok" and heads.metrics["period"] == 6 and heads.metrics["sequences"] == 8
    assert 0.0 <= heads.metrics["model/best_induction_score"] <= 1.0 and "twin/best_induction_score" in heads.metrics
    import json

    tb = json.loads((tmp_path / "run" / "results.json").read_text())["tensorboard"]
    assert "4 residual additions" in tb["written"]["graph"]["what"]  # gpt-tiny-2's graph, traced whole
    assert tb["written"]["pr"]["what"] == "16 tokens on 32 test sequences (384 next-token predictions)"
    assert tb["written"]["projector"]["what"].startswith("off (a language model")


def test_token_attribution_in_closed_form():
    """A model whose last-position logits are 10 · one-hot(token at position 2): integrated gradients and
    feature ablation give position 2 exactly log p(answer) − log p(answer | token 0 there) ≈ 10 nats and every
    other position 0 (integrated gradients' attributions add up to f(input) − f(baseline))."""
    from resinspect_plugins._token_attribution import deletion_drop, token_attributions

    class Copy(torch.nn.Module):
        def __init__(self, vocab, k):
            super().__init__()
            self.emb, self.k = torch.nn.Embedding(vocab, vocab), k
            with torch.no_grad():
                self.emb.weight.copy_(10 * torch.eye(vocab))

        def forward(self, tokens):
            e = self.emb(tokens)
            out = torch.zeros_like(e)
            out[:, -1] = e[:, self.k]
            return out

    model = Copy(8, 2).eval()
    tokens = torch.randint(1, 8, (5, 6))
    answer = tokens[:, 2]
    exact = 10.0  # log p with logits 10·e_answer minus log p with logits 10·e_0: exactly 10 nats
    got = token_attributions(model, tokens, answer, steps=16)
    for name, a in got.items():
        assert torch.allclose(a[:, 2], torch.full((5,), exact), atol=1e-4), name
        assert torch.allclose(a[:, [0, 1, 3, 4, 5]], torch.zeros(5, 5), atol=1e-6), name
    assert torch.allclose(deletion_drop(model, tokens, answer, got["feature_ablation"], 1), torch.full((5,), exact),
                          atol=1e-4)


def test_token_attribution_fits_the_compute_budget(tmp_path):
    """Each attributed sequence costs 3 · ig_steps + T + 7 passes of one sequence: a budget of 2.5 sequences'
    worth attributes 2 of the 6 asked for, and says so."""
    from resinspect.cost import multiply_adds

    data = load_induction(vocab=16, length=12, train=32, test=16)
    model = build_model("gpt-tiny-2", 1, 16, 12)
    per_sequence = multiply_adds(model, data.test[0][0][None]) * (3 * 4 + 12 + 7)
    result = resinspect.run(
        model=model, data=data, epochs=0, plugins=["attribution"], out=tmp_path / "run",
        options={"attribution": {"images": 6, "ig_steps": 4}}, compute=2.5 * per_sequence,
    )
    section = result.section("attribution")
    assert section.metrics["sequences"] == 2
    said = [f.text for f in section.findings if f.text.startswith("Fitted to the compute budget")]
    assert len(said) == 1 and "2 sequence(s) attributed instead of 6" in said[0] and " per sequence" in said[0]
