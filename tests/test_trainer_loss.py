"""Loss and masking of the trainer, checked against a naive reference on a tiny random Llama."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from fairdistill.trainer import data as D  # noqa: E402
from fairdistill.trainer.loss import TaskTokens, combine, fair_loss, micro_loss, per_token_loss  # noqa: E402
from fairdistill.trainer.model import tiny_llama  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tok():
    from fairdistill.trainer.model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def examples(tok):
    samples = D.synthetic_samples(3, seed=1)  # 3 rationale + 3 mistake samples of varied lengths
    ex, _ = D.tokenize(samples, tok, max_seq_len=1024)
    assert len({len(e.input_ids) for e in ex}) > 1
    return ex


def reference_ce(model, ex: D.Example) -> torch.Tensor:
    """Naive per-token CE of one example: full logits, shift by hand, response tokens only."""
    ids = torch.tensor([ex.input_ids])
    logits = model(ids, use_cache=False).logits[0, :-1]
    labels = ids[0, 1:]
    n_prompt = ex.targets.index(next(t for t in ex.targets if t != D.IGNORE_INDEX))
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return ce[n_prompt:]


def test_targets_mask_prompt_and_keep_end_of_turn(tok, examples):
    ex = examples[0]
    kept = [t for t in ex.targets if t != D.IGNORE_INDEX]
    assert kept[-1] == tok.eos_token_id  # the model learns to stop
    assert ex.targets[-1] == D.IGNORE_INDEX  # the last position predicts nothing
    # targets are the response tokens, shifted by one, and nothing of the prompt
    first = next(i for i, t in enumerate(ex.targets) if t != D.IGNORE_INDEX)
    assert kept == ex.input_ids[first + 1 :]
    prompt_text = tok.decode(ex.input_ids[: first + 1])
    assert prompt_text.endswith("<|im_start|>assistant\n")


def test_padding_is_masked_even_when_pad_is_eos(tok, examples):
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2: masking by pad id would drop the eos
    b = D.collate_padded(examples, tok.pad_token_id)
    pad = b.attention_mask == 0
    assert pad.any()
    assert (b.targets[pad] == D.IGNORE_INDEX).all() and (b.task_ids[pad] == -1).all()
    assert int((b.targets != D.IGNORE_INDEX).sum()) == sum(e.n_targets for e in examples)
    assert (b.targets == tok.eos_token_id).sum() == len(examples)  # each eos target kept once


def test_per_token_loss_matches_naive_reference(model, examples):
    ce, task = per_token_loss(model, D.collate_packed(examples[:1]))
    assert torch.allclose(ce, reference_ce(model, examples[0]), atol=1e-5)
    assert (task == examples[0].task).all()


def test_padded_batch_gives_same_loss_as_unpadded(model, tok, examples):
    single = [per_token_loss(model, D.collate_padded([e], tok.pad_token_id))[0] for e in examples]
    batched, _ = per_token_loss(model, D.collate_padded(examples, tok.pad_token_id))
    assert torch.allclose(batched, torch.cat(single), atol=1e-5)
    big = fair_loss(model, D.collate_padded(examples, tok.pad_token_id))
    ref = fair_loss(model, D.collate_packed(examples))
    assert torch.allclose(big, ref, atol=1e-5)


def test_packed_row_equals_unpacked_examples(model, examples):
    """Position ids restarting at 0 give a block-diagonal mask under SDPA: no cross-talk."""
    packed, _ = per_token_loss(model, D.collate_packed(examples))
    unpacked = torch.cat([reference_ce(model, e) for e in examples])
    assert torch.allclose(packed, unpacked, atol=1e-5)
    # and without the restarting position ids the later examples would differ (the test has teeth)
    b = D.collate_packed(examples)
    b.position_ids = None
    leaky, _ = per_token_loss(model, b)
    assert not torch.allclose(leaky, unpacked, atol=1e-3)


def test_varlen_attention_equals_unpacked_in_values_and_gradients(model, examples):
    """The recipe's per-example SDPA gives what transformers' block-diagonal mask gives."""
    import copy

    from fairdistill.trainer.loss import PACKED_ATTENTION, enable_packed_attention

    varlen = copy.deepcopy(model)
    assert enable_packed_attention(varlen) and varlen.config._attn_implementation == PACKED_ATTENTION
    batch = D.collate_packed(examples)
    ce_varlen, _ = per_token_loss(varlen, batch)
    ce_masked, _ = per_token_loss(model, batch)
    unpacked = torch.cat([reference_ce(model, e) for e in examples])
    assert torch.allclose(ce_varlen, unpacked, atol=1e-5) and torch.allclose(ce_masked, unpacked, atol=1e-5)
    ce_varlen.sum().backward()
    ce_masked.sum().backward()
    for (name, a), b in zip(varlen.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    model.zero_grad()
    # a padded batch through the varlen model still uses the padding mask
    padded = D.collate_padded(examples, 0)
    assert torch.allclose(per_token_loss(varlen, padded)[0], unpacked, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_alpha_weights_the_two_token_means(model, examples, alpha):
    mis = torch.cat([reference_ce(model, e) for e in examples if e.task == 1])
    rat = torch.cat([reference_ce(model, e) for e in examples if e.task == 0])
    expected = alpha * mis.mean() + (1 - alpha) * rat.mean()
    got = fair_loss(model, D.collate_packed(examples), alpha)
    assert torch.allclose(got, expected, atol=1e-5)


def test_one_task_batch_keeps_its_weight(model, examples):
    """Documented choice: a missing term contributes 0 and the weights are not renormalised."""
    rationale_only = [e for e in examples if e.task == 0]
    rat = torch.cat([reference_ce(model, e) for e in rationale_only]).mean()
    got = fair_loss(model, D.collate_packed(rationale_only), alpha=0.5)
    assert torch.allclose(got, 0.5 * rat, atol=1e-5)
    assert fair_loss(model, D.collate_packed(rationale_only), alpha=1.0).item() == 0.0


def test_empty_targets_still_backpropagate():
    ce = torch.zeros(0, requires_grad=True)
    loss = combine(ce, torch.zeros(0, dtype=torch.long), 0.5, 0, 0)
    loss.backward()  # no error, no effect
    assert loss.item() == 0.0


def test_grad_accumulation_equals_one_big_batch(model, examples):
    """Micro-batches normalised by the step's token counts give the big batch's gradients,
    though the micro-batches hold very different numbers of tokens."""
    params = [p for p in model.parameters() if p.requires_grad]

    def grads_of(groups: list[list[D.Example]]) -> list[torch.Tensor]:
        model.zero_grad()
        batches = [D.collate_packed(g) for g in groups]
        n = TaskTokens.of(batches)
        for b in batches:
            micro_loss(model, b, 0.5, n)[0].backward()
        return [p.grad.clone() for p in params]

    big = grads_of([examples])
    accumulated = grads_of([examples[:1], examples[1:4], examples[4:]])
    for g_big, g_acc in zip(big, accumulated, strict=True):
        assert torch.allclose(g_big, g_acc, atol=1e-6, rtol=1e-4)
    model.zero_grad()


def test_chunked_cross_entropy_matches_plain():
    from fairdistill.trainer.loss import token_ce

    torch.manual_seed(0)
    h = torch.randn(50, 8, requires_grad=True)
    w = torch.randn(30, 8)
    t = torch.randint(0, 30, (50,))
    plain = token_ce(h, w, t, chunk=1000)
    (g_plain,) = torch.autograd.grad(plain.sum(), h)
    chunked = token_ce(h, w, t, chunk=16)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), h)
    assert torch.allclose(plain, chunked, atol=1e-6) and torch.allclose(g_plain, g_chunked, atol=1e-6)


def test_split_by_problem_has_no_leakage_and_is_seeded():
    samples = D.synthetic_samples(30, seed=0)
    train, val = D.split_by_problem(samples, 0.2, seed=7)
    assert {s.problem_id for s in train}.isdisjoint({s.problem_id for s in val})
    assert len({s.problem_id for s in val}) == 6 and len(train) + len(val) == len(samples)
    assert D.split_by_problem(samples, 0.2, seed=7)[1] == val
    assert D.split_by_problem(samples, 0.2, seed=8)[1] != val
