"""fast_dropout: the same dropout (rate, scaling, places), cheaper masks; eval untouched."""

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.models.bart import modeling_bart
from transformers.models.t5 import modeling_t5
from transformers.models.t5.modeling_t5 import T5Attention

from dataset import DailyDialogDataset, collate
from t5dialog import fast_dropout, models

CPU = torch.device("cpu")


def test_keep_mask_keeps_each_element_with_probability_one_minus_p():
    torch.manual_seed(0)
    n = 4_000_000
    for p in (0.1, 0.5):
        keep = fast_dropout.keep_mask((n + 3,), round(p * 65536)).float()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(keep.mean().item() - (1 - p)) < 6 * sigma
        # Each of the four 16-bit lanes of a 64-bit draw is uniform (no lane stuck on a sign bit).
        for lane in keep[:n].view(-1, 4).mean(0).tolist():
            assert abs(lane - (1 - p)) < 6 * sigma * 2


def test_apply_dropout_zeroes_and_rescales_and_its_gradient_matches():
    torch.manual_seed(0)
    x = torch.rand(300, 200) + 0.5
    x.requires_grad_(True)
    y = fast_dropout.apply_dropout(x, 0.25)
    y.sum().backward()
    dropped = y == 0
    assert 0.2 < dropped.float().mean().item() < 0.3
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.75)
    assert (x.grad[dropped] == 0).all() and torch.allclose(x.grad[~dropped], torch.full_like(x.grad[~dropped], 1 / 0.75))
    assert fast_dropout.apply_dropout(x, 0.0) is x
    assert (fast_dropout.apply_dropout(x, 1.0) == 0).all()  # nn.Dropout(1.0) drops everything
    assert (fast_dropout.apply_dropout(x, 0.999999) == 0).all()  # rounds to 1, not past the last bucket


def _batch(tiny_model, data_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = DailyDialogDataset(tok, data_dir / "train.txt", max_length=64)
    return collate(ds.examples[:6], tok.pad_token_id)  # rows of different lengths: masks matter


def test_installed_model_computes_the_same_function_in_eval(tiny_model, data_dir):
    batch = _batch(tiny_model, data_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        before = models.token_loss_sum(model, batch)
        changed = fast_dropout.install(model, CPU)
        after = models.token_loss_sum(model, batch)
    n_dropouts = sum(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert changed > n_dropouts > 0
    assert all(type(m) is fast_dropout.FastDropout for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert not any(m.training for m in model.modules())  # the new modules took the model's eval mode
    assert model.config._attn_implementation == fast_dropout.ATTENTION
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-4)


def test_installed_model_trains_like_the_original_without_dropout_and_reproducibly_with_it(tiny_model, data_dir):
    batch = _batch(tiny_model, data_dir)

    def loss(p, install, seed):
        model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model, dropout_rate=p).train()
        if install:
            fast_dropout.install(model, CPU)
        torch.manual_seed(seed)
        return models.token_loss_sum(model, batch).item()

    assert abs(loss(0.0, True, 0) - loss(0.0, False, 0)) < 1e-3  # attention and masks are the same math
    assert loss(0.1, True, 1) == loss(0.1, True, 1)  # masks come from torch's seeded generator
    assert loss(0.1, True, 1) != loss(0.1, True, 2)
    assert loss(0.1, True, 1) != loss(0.0, True, 1)  # dropout is really applied in training


def test_attention_probabilities_get_dropout_in_training_only(tiny_model, data_dir):
    """With every hidden-state dropout off, only the attention's own dropout can change the loss."""
    batch = _batch(tiny_model, data_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model, dropout_rate=0.5)
    fast_dropout.install(model, CPU)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        model.eval()
        clean = models.token_loss_sum(model, batch).item()
        model.train()
        torch.manual_seed(0)
        noisy = models.token_loss_sum(model, batch).item()
        model.eval()
        assert models.token_loss_sum(model, batch).item() == clean
    assert abs(noisy - clean) > 1e-3


def test_install_leaves_gpu_models_alone_and_checkpoints_load_without_it(tiny_model, tmp_path):
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model)
    assert fast_dropout.install(model, torch.device("cuda")) == 0
    assert not any(type(m) is fast_dropout.FastDropout for m in model.modules())
    fast_dropout.install(model, CPU)
    model.save_pretrained(tmp_path)
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert again.config._attn_implementation != fast_dropout.ATTENTION
    assert not any(type(m) is fast_dropout.FastDropout for m in again.modules())


class OwnForwardAttention(T5Attention):
    """T5's attention with a forward of its own, as a transformers without the attention registry has it: it
    never looks its function up there, so fast_dropout's attention cannot take its place."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_the_installed_transformers_has_what_the_attention_relies_on(tiny_model):
    assert fast_dropout.missing_internals(AutoModelForSeq2SeqLM.from_pretrained(tiny_model)) is None
    assert fast_dropout.computes_like(modeling_t5.eager_attention_forward)
    assert not fast_dropout.computes_like(modeling_bart.eager_attention_forward)  # no position bias: other numbers


def test_without_those_internals_the_attention_keeps_torchs_dropout_once_noted_and_training_works(
        tiny_model, data_dir, capsys):
    def model_without_registry_lookup():
        model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model).train()
        model.set_attn_implementation("eager")  # as models.prepare_for_training sets it before installing
        for attention in fast_dropout.t5_attentions(model):
            attention.__class__ = OwnForwardAttention
        return model

    fast_dropout.note_fallback.cache_clear()  # the note is once per process; this test wants to see it
    model = model_without_registry_lookup()
    assert "does not look its attention up" in fast_dropout.missing_internals(model)
    changed = fast_dropout.install(model, CPU)
    fast_dropout.install(model_without_registry_lookup(), CPU)
    assert capsys.readouterr().out.count("note: fast dropout leaves the attention's dropout to torch") == 1
    assert changed == sum(isinstance(m, torch.nn.Dropout) for m in model.modules())  # the dropouts, no attention
    assert model.config._attn_implementation == "eager"  # its own, with torch's dropout

    batch = _batch(tiny_model, data_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(10):
        loss = models.token_loss_sum(model, batch) / (batch["labels"] != -100).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
