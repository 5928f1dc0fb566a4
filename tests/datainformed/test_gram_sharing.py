"""Grams shared by layers that read the very same input tensor, and opt-in token subsampling."""

import pytest
import torch
from torch import nn

import modelalloy.stats.collect as collect
from modelalloy.stats import collect_grams, load_stats, save_stats


def _tiny_llama(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                   max_position_embeddings=32, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _inputs_by_layer(model, batches):
    """Every linear layer's kept input rows (mask applied), captured independently."""
    got: dict[str, list[torch.Tensor]] = {}
    mask_now = {}

    def hook(name):
        def f(_m, args):
            x = args[0].detach()
            m = mask_now["m"]
            rows = x[m] if m is not None and x.shape[:-1] == m.shape else x.reshape(-1,
                                                                                   x.shape[-1])
            got.setdefault(name, []).append(rows.double())
        return f

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear)]
    with torch.no_grad():
        for b in batches:
            mask_now["m"] = b["attention_mask"].bool()
            model(**b)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


class _CountRows:
    """Counts the multiply-adds handed to the Gram products (rows × d², per width)."""

    def __init__(self, monkeypatch):
        self.rows: dict[int, int] = {}
        orig = collect._GramSum._multiply

        def counted(acc, r):
            self.rows[acc.d] = self.rows.get(acc.d, 0) + r.shape[0]
            orig(acc, r)

        monkeypatch.setattr(collect._GramSum, "_multiply", counted)

    def macs(self) -> int:
        return sum(n * d * d for d, n in self.rows.items())


def test_llama_qkv_and_gate_up_share_one_gram_equal_to_xtx(monkeypatch, lm_batches):
    model = _tiny_llama()
    batches = lm_batches(1, n_batches=3, batch=3, length=7)
    counter = _CountRows(monkeypatch)
    got = collect_grams(model, batches, reduce="sum")
    shared_rows = dict(counter.rows)
    inputs = _inputs_by_layer(model, batches)
    n = int(sum(b["attention_mask"].sum() for b in batches))
    for i in range(2):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            module = f"model.layers.{i}.{name}"
            x = inputs[module]
            torch.testing.assert_close(got[f"{module}.weight"].double(), x.T @ x,
                                       rtol=1e-5, atol=1e-4)
            assert got.counts[f"{module}.weight"] == n == x.shape[0]
        q = got[f"model.layers.{i}.self_attn.q_proj.weight"]
        # one product, written for each layer (independent tensors)
        assert torch.equal(q, got[f"model.layers.{i}.self_attn.v_proj.weight"])
        assert q.data_ptr() != got[f"model.layers.{i}.self_attn.k_proj.weight"].data_ptr()
        assert torch.equal(got[f"model.layers.{i}.mlp.gate_proj.weight"],
                           got[f"model.layers.{i}.mlp.up_proj.weight"])

    # per layer, hidden-size inputs: 3 distinct (q/k/v, o, gate/up) instead of 6; + lm_head
    assert shared_rows[32] == n * (3 * 2 + 1)
    assert shared_rows[48] == n * 2
    counter.rows.clear()
    monkeypatch.setattr(collect, "GRAM_SHARE", False)
    separate = collect_grams(model, batches, reduce="sum")
    assert counter.rows[32] == n * (6 * 2 + 1)
    shared_macs = sum(r * d * d for d, r in shared_rows.items())
    assert counter.macs() > 1.5 * shared_macs  # the Gram multiply-adds drop by a third or more
    assert set(separate) == set(got)
    for k in got:  # the same rows in the same order: bit-identical
        assert torch.equal(got[k], separate[k]), k
        assert got.counts[k] == separate.counts[k]


def test_shared_grams_save_the_same_file_format(tmp_path, lm_batches):
    model = _tiny_llama()
    stat = collect_grams(model, lm_batches(2))
    path = save_stats(stat, tmp_path / "gram.safetensors")
    back = load_stats(path)
    assert set(back) == set(stat) and back.kind == "gram"
    for k in stat:
        assert torch.equal(back[k], stat[k])
    assert "token_fraction" not in back.meta


class _Switch(nn.Module):
    """Two linears that read one tensor, except where ``plan`` says otherwise per call."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.a = nn.Linear(d, 2)
        self.b = nn.Linear(d, 2)
        self.c = nn.Linear(d, 2)
        self.plan: list[str] = []
        self.calls = 0

    def forward(self, inputs_embeds, attention_mask=None):
        x = inputs_embeds * 1.0
        mode = self.plan[self.calls % len(self.plan)]
        self.calls += 1
        if mode == "shared":  # a, b, c read one tensor
            return self.a(x) + self.b(x) + self.c(x)
        if mode == "diverge":  # b reads another tensor
            return self.a(x) + self.b(x + 1.0) + self.c(x)
        if mode == "skip":  # c is not called
            return self.a(x) + self.b(x)
        if mode == "repeat":  # a twice before its siblings, on another tensor
            return self.a(x) + self.a(x * 2.0) + self.b(x) + self.c(x)
        if mode == "twice":  # the whole group twice, on two tensors
            y = x * 3.0
            return self.a(x) + self.b(x) + self.c(x) + self.a(y) + self.b(y) + self.c(y)
        if mode == "view":  # the same memory through distinct view objects
            return self.a(x.view(x.shape)) + self.b(x.view(x.shape)) + self.c(x)
        raise AssertionError(mode)


@pytest.mark.parametrize("plan", [
    ["shared", "shared", "shared"],
    ["shared", "diverge", "shared"],
    ["shared", "skip", "shared"],
    ["shared", "repeat", "shared"],
    ["twice", "shared", "twice"],
    ["view", "view", "diverge"],
    ["diverge", "shared", "shared"],
    ["shared", "shared", "skip"],
])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("syrk", [True, False])
def test_sharing_is_exact_whatever_the_call_pattern(monkeypatch, plan, fraction, syrk):
    monkeypatch.setattr(collect, "GRAM_SYRK", syrk)
    monkeypatch.setattr(collect, "GRAM_BLOCK", 2)  # the torch path: 2-wide triangle blocks
    gen = torch.Generator().manual_seed(3)
    batches = [{"inputs_embeds": torch.randn(2, 5, 6, generator=gen),
                "attention_mask": (torch.rand(2, 5, generator=gen) > 0.3).long()}
               for _ in plan]
    model = _Switch()
    model.plan = plan
    counter = _CountRows(monkeypatch)
    got = collect_grams(model, batches, reduce="sum", token_fraction=fraction)
    shared_rows = counter.rows.get(6, 0)
    model.calls = 0
    monkeypatch.setattr(collect, "GRAM_SHARE", False)
    counter.rows.clear()
    want = collect_grams(model, batches, reduce="sum", token_fraction=fraction)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
        assert got.counts[k] == want.counts[k], k
    if plan == ["shared"] * 3:
        assert shared_rows * 3 == counter.rows[6]


def test_token_fraction_one_is_exact(tiny_gpt2, lm_batches):
    model = tiny_gpt2()
    batches = lm_batches(4)
    exact = collect_grams(model, batches)
    same = collect_grams(model, batches, token_fraction=1.0, seed=5)
    for k in exact:
        assert torch.equal(exact[k], same[k])
    assert same.meta == exact.meta and same.counts == exact.counts
    with pytest.raises(ValueError):
        collect_grams(model, batches, token_fraction=0.0)


def test_token_fraction_scales_to_the_full_gram(tiny_gpt2, lm_batches):
    # identical rows and r·n an integer (m = r·n rows used): any subset, divided by r, gives
    # exactly the full Gram
    lin = nn.Linear(4, 3)
    x = torch.tensor([1.0, -2.0, 0.5, 3.0]).expand(5, 9, 4).contiguous()
    mask = torch.ones(5, 9, dtype=torch.long)
    mask[0, 4:] = 0  # 40 kept rows

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, inputs_embeds, attention_mask):
            return self.lin(inputs_embeds)

    batches = [{"inputs_embeds": x, "attention_mask": mask}]
    full = collect_grams(Wrap(), batches, reduce="sum")
    part = collect_grams(Wrap(), batches, reduce="sum", token_fraction=0.25, seed=1)
    torch.testing.assert_close(part["lin.weight"], full["lin.weight"], rtol=1e-5, atol=1e-4)
    assert part.counts == full.counts == {"lin.weight": 40}
    assert part.meta["token_fraction"] == "0.25" and part.meta["seed"] == "1"
    mean = collect_grams(Wrap(), batches, token_fraction=0.25, seed=1)  # reduce="mean"
    torch.testing.assert_close(mean["lin.weight"], full["lin.weight"] / 40)

    # general inputs: deterministic per seed, and unbiased (the mean over seeds -> full Gram)
    model = tiny_gpt2()
    batches = lm_batches(6, n_batches=2, batch=4, length=8)
    exact = collect_grams(model, batches, reduce="sum")
    a = collect_grams(model, batches, reduce="sum", token_fraction=0.5, seed=7)
    b = collect_grams(model, batches, reduce="sum", token_fraction=0.5, seed=7)
    c = collect_grams(model, batches, reduce="sum", token_fraction=0.5, seed=8)
    key = "transformer.h.1.mlp.c_proj.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    assert a.counts == exact.counts
    # unbiased: over many seeds, the mean of the estimates converges to the full Gram at the
    # 1/sqrt(seeds) rate of the estimates' own spread (a bias would leave a floor)
    gen = torch.Generator().manual_seed(0)
    batches = [{"inputs_embeds": torch.randn(3, 5, 4, generator=gen),
                "attention_mask": (torch.rand(3, 5, generator=gen) > 0.2).long()}
               for _ in range(2)]
    target = collect_grams(Wrap(), batches, reduce="sum")["lin.weight"].double()
    seeds = 2000
    draws = torch.stack([collect_grams(Wrap(), batches, reduce="sum", token_fraction=0.4,
                                       seed=s)["lin.weight"].double() for s in range(seeds)])
    spread = ((draws - target) ** 2).sum((1, 2)).mean().sqrt()
    err_mean = (draws.mean(0) - target).norm()
    assert spread > 0.1 * target.norm()  # single estimates do differ from the full Gram
    assert err_mean < 3 * spread / seeds ** 0.5, (float(err_mean), float(spread))
