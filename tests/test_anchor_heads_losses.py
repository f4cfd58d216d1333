"""VID, CRD, OFD and ReviewKD: each loss against a hand computation or an independent formula, the heads' shapes,
CRD's memory (update, Z, DDP-style gathered updates) and sampler (rules, determinism), gradients, bad input.

The side-by-side comparison with the authors' code lives outside the project (it needs their repositories); these
tests use loops and closed forms only.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.methods.crd import ContrastMemory, ContrastSampler, Embed, contrast_loss
from lightning_kd.methods.ofd import (
    OFDConnector,
    margin_from_batchnorm,
    ofd_loss,
    ofd_margin,
    ofd_stage_weights,
)
from lightning_kd.methods.reviewkd import ABF, ReviewKDFusion, hcl_loss
from lightning_kd.methods.vid import VIDRegressor, vid_loss


def block_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average over non-overlapping blocks down to size×size (equals adaptive pooling when the size divides)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


# ----------------------------------------------------------------------------------------------------------- VID


def test_vid_loss_matches_a_loop_over_elements():
    torch.manual_seed(0)
    mu, t = torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.randn(2, 3, 2, 2, dtype=torch.float64)
    var = torch.tensor([0.5, 2.0, 5.0], dtype=torch.float64)
    total, count = 0.0, 0
    for b in range(2):
        for c in range(3):
            for h in range(2):
                for w in range(2):
                    diff = (t[b, c, h, w] - mu[b, c, h, w]).item()
                    total += 0.5 * (diff**2 / var[c].item() + math.log(var[c].item()))
                    count += 1
    assert vid_loss(mu, t, var).item() == pytest.approx(total / count, rel=1e-12)


def test_vid_loss_is_the_gaussian_negative_log_likelihood_up_to_its_constant():
    torch.manual_seed(1)
    mu, t = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    var = torch.rand(4, dtype=torch.float64) + 0.1
    nll = -torch.distributions.Normal(mu, var.sqrt().view(1, -1, 1, 1)).log_prob(t).mean()
    assert (vid_loss(mu, t, var) + 0.5 * math.log(2 * math.pi)).item() == pytest.approx(nll.item(), rel=1e-12)


@pytest.mark.parametrize("student, teacher", [((8, 8), (16, 4)), ((32, 4), (6, 8)), ((5, 6), (7, 6))])
def test_vid_regressor_shapes_variance_and_pooling(student, teacher):
    (cs, hs), (ct, ht) = student, teacher
    head = VIDRegressor(cs, ct).double()
    assert torch.allclose(head.variance(), torch.full((ct,), 5.0, dtype=torch.float64), atol=1e-12)
    s, t = torch.randn(2, cs, hs, hs, dtype=torch.float64), torch.randn(2, ct, ht, ht, dtype=torch.float64)
    size = min(hs, ht)
    assert head(block_mean(s, size)).shape == (2, ct, size, size)
    expected = vid_loss(head(block_mean(s, size)), block_mean(t, size), head.variance())
    assert head.loss(s, t).item() == pytest.approx(expected.item(), rel=1e-12)


def test_vid_variance_is_softplus_plus_eps_and_gradients_reach_every_parameter():
    torch.manual_seed(2)
    head = VIDRegressor(4, 6, mid_channels=5, init_variance=2.0, eps=1e-3)
    with torch.no_grad():
        head.log_scale.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0, 30.0]))
    expected = [math.log1p(math.exp(a)) + 1e-3 for a in head.log_scale.tolist()]
    assert head.variance().tolist() == pytest.approx(expected, rel=1e-6)
    s = torch.randn(2, 4, 4, 4, requires_grad=True)
    head.loss(s, torch.randn(2, 6, 4, 4)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_vid_bad_input_raises_one_clear_error():
    with pytest.raises(ValueError, match="init_variance"):
        VIDRegressor(4, 4, init_variance=1e-6)
    head = VIDRegressor(4, 6)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        head(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        head.loss(torch.randn(2, 4, 4, 4), torch.randn(2, 7, 4, 4))
    with pytest.raises(ValueError, match="one variance per channel"):
        vid_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.ones(4))


# ----------------------------------------------------------------------------------------------------------- CRD


def test_contrast_loss_matches_a_hand_computation():
    scores = [[0.9, 0.01, 0.2, 0.03], [0.05, 0.4, 0.001, 0.07]]
    m, k = 10, 3
    noise = k / m
    expected = 0.0
    for row in scores:
        expected += math.log(row[0] / (row[0] + noise + 1e-7))
        expected += sum(math.log(noise / (p + noise + 1e-7)) for p in row[1:])
    expected = -expected / len(scores)
    got = contrast_loss(torch.tensor(scores, dtype=torch.float64), m)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_embed_is_a_linear_map_followed_by_l2_normalisation():
    torch.manual_seed(3)
    embed = Embed(6, 4).double()
    x = torch.randn(3, 6, 1, 1, dtype=torch.float64)
    out = embed(x)
    assert out.shape == (3, 4)
    raw = x.reshape(3, 6) @ embed.linear.weight.T + embed.linear.bias
    for row, ref in zip(out, raw):
        norm = math.sqrt(sum(v * v for v in ref.tolist()))
        assert row.tolist() == pytest.approx([v / norm for v in ref.tolist()], rel=1e-12)
    assert Embed(256).linear.out_features == 128


def small_memory(num_samples=12, feat_dim=4, seed=0) -> ContrastMemory:
    return ContrastMemory(num_samples, feat_dim, temperature=0.5, momentum=0.5,
                          generator=torch.Generator().manual_seed(seed)).double()


def test_memory_initial_banks_and_unset_normalisers():
    memory = ContrastMemory(50, 12, generator=torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(12 / 3)
    for bank in (memory.memory_student, memory.memory_teacher):
        assert bank.shape == (50, 12) and bank.abs().max() <= bound
    assert not torch.equal(memory.memory_student, memory.memory_teacher)
    assert memory.normalizers.tolist() == [-1.0, -1.0] and not memory.normalizers_set
    assert set(memory.state_dict()) == {"memory_student", "memory_teacher", "normalizers"}
    again = ContrastMemory(50, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.memory_student, memory.memory_student)
    torch.manual_seed(3)
    first = ContrastMemory(50, 12).memory_teacher
    torch.manual_seed(3)
    assert torch.equal(ContrastMemory(50, 12).memory_teacher, first)  # the global RNG alone decides the banks


def test_memory_scores_and_z_match_a_loop_and_z_is_frozen_after_first_use():
    torch.manual_seed(4)
    memory = small_memory()
    s = F.normalize(torch.randn(2, 4, dtype=torch.float64), dim=1)
    t = F.normalize(torch.randn(2, 4, dtype=torch.float64), dim=1)
    contrast_index = torch.tensor([[3, 0, 7], [5, 11, 3]])
    raw_s = [[math.exp(sum(a * b for a, b in zip(memory.memory_teacher[j].tolist(), s[i].tolist())) / 0.5)
              for j in row] for i, row in enumerate(contrast_index.tolist())]
    raw_t = [[math.exp(sum(a * b for a, b in zip(memory.memory_student[j].tolist(), t[i].tolist())) / 0.5)
              for j in row] for i, row in enumerate(contrast_index.tolist())]
    z_s = 12 * sum(map(sum, raw_s)) / 6
    z_t = 12 * sum(map(sum, raw_t)) / 6
    out_s, out_t = memory(s, t, contrast_index)
    assert memory.normalizers.tolist() == pytest.approx([z_s, z_t], rel=1e-12)
    assert out_s.tolist() == [pytest.approx([v / z_s for v in row], rel=1e-12) for row in raw_s]
    assert out_t.tolist() == [pytest.approx([v / z_t for v in row], rel=1e-12) for row in raw_t]
    # A second batch with other scores keeps Z; the scores alone never move the banks.
    banks = memory.memory_student.clone(), memory.memory_teacher.clone()
    memory(-s, t * 0.5, contrast_index.flip(1))
    assert memory.normalizers.tolist() == pytest.approx([z_s, z_t], rel=1e-12)
    assert torch.equal(banks[0], memory.memory_student) and torch.equal(banks[1], memory.memory_teacher)


def test_z_is_checkpointed_and_taken_across_ranks():
    torch.manual_seed(5)
    memory = small_memory()
    s = F.normalize(torch.randn(2, 4, dtype=torch.float64), dim=1)
    t = F.normalize(torch.randn(2, 4, dtype=torch.float64), dim=1)
    contrast_index = torch.tensor([[1, 2], [3, 4]])
    memory(s, t, contrast_index)
    restored = small_memory(seed=9)
    restored.load_state_dict(memory.state_dict())
    out = restored(-s, t, contrast_index)  # other scores: Z must come from the checkpoint
    assert torch.equal(restored.normalizers, memory.normalizers)
    assert torch.allclose(out[0], memory(-s, t, contrast_index)[0])
    synced = small_memory()
    synced(s, t, contrast_index, mean_across_ranks=lambda means: torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert synced.normalizers.tolist() == [24.0, 36.0]


def test_memory_update_matches_a_hand_computation_and_keeps_the_last_duplicate():
    memory = small_memory()
    before_s, before_t = memory.memory_student.clone(), memory.memory_teacher.clone()
    index = torch.tensor([2, 9, 2])
    vs = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]], dtype=torch.float64)
    vt = torch.tensor([[0, 0, 0, 1.0], [0, 0, 1.0, 0], [0, 1.0, 0, 0]], dtype=torch.float64)
    memory.update(index, vs, vt)

    def expected(row, v):
        mixed = [0.5 * a + 0.5 * b for a, b in zip(row, v)]
        norm = math.sqrt(sum(x * x for x in mixed))
        return [x / norm for x in mixed]

    # index 2 appears twice: the last occurrence (position 2) is the one written.
    assert memory.memory_student[2].tolist() == pytest.approx(expected(before_s[2].tolist(), vs[2].tolist()), rel=1e-12)
    assert memory.memory_teacher[2].tolist() == pytest.approx(expected(before_t[2].tolist(), vt[2].tolist()), rel=1e-12)
    assert memory.memory_student[9].tolist() == pytest.approx(expected(before_s[9].tolist(), vs[1].tolist()), rel=1e-12)
    untouched = [i for i in range(12) if i not in (2, 9)]
    assert torch.equal(memory.memory_student[untouched], before_s[untouched])
    assert torch.equal(memory.memory_teacher[untouched], before_t[untouched])


def test_gathered_updates_keep_the_banks_identical_across_ranks():
    torch.manual_seed(6)
    ranks = [small_memory(seed=3), small_memory(seed=3)]
    local = [torch.tensor([0, 5]), torch.tensor([7, 5])]  # index 5 on both ranks (padding of the last batch)
    embeds = [[F.normalize(torch.randn(2, 4, dtype=torch.float64), dim=1) for _ in range(2)] for _ in range(2)]
    losses = []
    for rank, memory in enumerate(ranks):
        s, t = embeds[rank]
        contrast_index = torch.stack([local[rank], torch.tensor([1, 2])], dim=1)
        out_s, out_t = memory(s, t, contrast_index, mean_across_ranks=lambda means: means * 0 + 1.0)
        losses.append(contrast_loss(out_s, 12) + contrast_loss(out_t, 12))
    gathered_index = torch.cat(local)
    gathered_s = torch.cat([e[0] for e in embeds])
    gathered_t = torch.cat([e[1] for e in embeds])
    for memory in ranks:
        memory.update(gathered_index, gathered_s, gathered_t)
    assert torch.equal(ranks[0].memory_student, ranks[1].memory_student)
    assert torch.equal(ranks[0].memory_teacher, ranks[1].memory_teacher)
    assert torch.equal(ranks[0].normalizers, ranks[1].normalizers)
    assert all(torch.isfinite(loss) for loss in losses)


def test_crd_gradients_reach_both_embeddings_and_never_the_banks():
    torch.manual_seed(7)
    embed_s, embed_t = Embed(6, 4), Embed(3, 4)
    memory = ContrastMemory(20, 4)
    x_s = torch.randn(5, 6, requires_grad=True)
    s, t = embed_s(x_s), embed_t(torch.randn(5, 3))
    contrast_index = ContrastSampler(torch.arange(20) % 4, 6)(torch.arange(5))
    out_s, out_t = memory(s, t, contrast_index)
    (contrast_loss(out_s, 20) + contrast_loss(out_t, 20)).backward()
    for module in (embed_s, embed_t):
        assert module.linear.weight.grad is not None and module.linear.weight.grad.abs().sum() > 0
    assert x_s.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in memory.buffers())
    memory.update(torch.arange(5), s, t)  # live (non-detached) embeddings are fine: no graph is recorded
    assert not memory.memory_student.requires_grad


def test_sampler_default_follows_repdistiller_exact_mode():
    labels = torch.arange(60) % 6  # 6 classes of 10: 50 candidates per sample
    sampler = ContrastSampler(labels, num_negatives=30)
    index = torch.tensor([0, 7, 13, 59])
    out = sampler(index, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 31) and out.dtype == torch.int64
    assert torch.equal(out[:, 0], index)
    for row, i in zip(out[:, 1:], index):
        assert len(set(row.tolist())) == 30  # without replacement
        assert not (labels[row] == labels[i]).any()  # never the sample's class (nor itself)


def test_sampler_negatives_are_uniform_over_the_other_classes():
    labels = torch.arange(40) % 4
    sampler = ContrastSampler(labels, num_negatives=10)
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(40)
    draws = 3000
    for _ in range(draws // 10):
        out = sampler(torch.zeros(10, dtype=torch.int64), generator=generator)
        counts += torch.bincount(out[:, 1:].reshape(-1), minlength=40)
    assert counts[labels == 0].sum() == 0
    expected = draws * 10 / 30
    assert ((counts[labels != 0] - expected).abs() / expected).max() < 0.15


def test_sampler_is_deterministic_given_the_generator_or_the_global_rng():
    labels = torch.arange(100) % 7
    sampler = ContrastSampler(labels, num_negatives=20, mode="relax")
    index = torch.tensor([3, 50, 99])
    a = sampler(index, generator=torch.Generator().manual_seed(42))
    b = sampler(index, generator=torch.Generator().manual_seed(42))
    c = sampler(index, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)
    d = sampler(index)
    torch.manual_seed(11)
    assert torch.equal(d, sampler(index))
    # relax: a positive of the same class
    assert torch.equal(labels[a[:, 0]], labels[index])


def test_sampler_with_replacement_and_uniform_variants():
    labels = torch.tensor([0] * 3 + [1] * 9)
    # class 1 has only 3 other-class samples for 5 negatives: its rows fall back to replacement (as theirs)
    mixed = ContrastSampler(labels, num_negatives=5)(torch.tensor([0, 5]), generator=torch.Generator().manual_seed(0))
    assert len(set(mixed[0, 1:].tolist())) == 5 and (labels[mixed[0, 1:]] == 1).all()
    assert (labels[mixed[1, 1:]] == 0).all()
    imagenet_like = ContrastSampler(labels, num_negatives=50, replacement=True)(torch.tensor([4]))
    assert (labels[imagenet_like[0, 1:]] == 0).all()
    alias_like = ContrastSampler(labels, num_negatives=500, negatives="all", replacement=True)(torch.tensor([4]))
    assert alias_like[0, 1:].min() >= 0 and alias_like[0, 1:].max() < 12
    assert (labels[alias_like[0, 1:]] == 1).any()  # own class allowed
    assert not ContrastSampler(labels, 2).state_dict()  # rebuilt from the data, never checkpointed


def test_crd_bad_input_raises_one_clear_error():
    memory = ContrastMemory(10, 4)
    s = F.normalize(torch.randn(2, 4), dim=1)
    with pytest.raises(ValueError, match="int64"):
        memory(s, s, torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        memory(s, s, torch.tensor([[0, 1], [2, 10]]))
    with pytest.raises(ValueError, match=r"\(B, 1 \+ N\)"):
        memory(s, s, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="teacher_embed"):
        memory(s, torch.randn(2, 5), torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        memory.update(torch.tensor([0, -1]), s, s)
    with pytest.raises(ValueError, match="temperature"):
        ContrastMemory(10, 4, temperature=0.0)
    with pytest.raises(ValueError, match="momentum"):
        ContrastMemory(10, 4, momentum=1.5)
    with pytest.raises(ValueError, match="mode"):
        ContrastSampler(torch.arange(10), 3, mode="nearest")
    with pytest.raises(ValueError, match="1-D integer"):
        ContrastSampler(torch.zeros(2, 5, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="two classes"):
        ContrastSampler(torch.zeros(10, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="Embed expects 6"):
        Embed(6)(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"\(B, 1 \+ N\)"):
        contrast_loss(torch.rand(3, 1), 10)


# ----------------------------------------------------------------------------------------------------------- OFD


def phi_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def negative_mean_by_integration(mean: float, std: float) -> float:
    """E[x | x < 0] for x ~ N(mean, std²) by a midpoint sum over (mean − 12·std, 0)."""
    low, steps = mean - 12 * std, 200_000
    width = (0 - low) / steps
    numerator = denominator = 0.0
    for i in range(steps):
        x = low + (i + 0.5) * width
        density = math.exp(-0.5 * ((x - mean) / std) ** 2)
        numerator += x * density
        denominator += density
    return numerator / denominator


def test_ofd_margin_is_the_mean_of_the_negative_part():
    weight = torch.tensor([1.0, -0.5, 2.0, 0.3, 0.1], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.4, -1.0, 0.9, 2.0], dtype=torch.float64)
    margin = ofd_margin(weight, bias)
    for c in range(4):  # Φ(−β/|γ|) > 0.001: the conditional mean
        std, mean = abs(weight[c].item()), bias[c].item()
        assert phi_cdf(-mean / std) > 0.001
        assert margin[c].item() == pytest.approx(negative_mean_by_integration(mean, std), abs=1e-6)
    assert phi_cdf(-2.0 / 0.1) <= 0.001 and margin[4].item() == pytest.approx(-0.3, rel=1e-12)  # −3|γ|
    assert (margin <= 0).all()
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.copy_(weight.float())
        bn.bias.copy_(bias.float())
    assert margin_from_batchnorm(bn).dtype == torch.float32
    assert torch.allclose(margin_from_batchnorm(bn).double(), margin, atol=1e-6)


def test_ofd_loss_matches_the_case_table_element_by_element():
    torch.manual_seed(8)
    s = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    t = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    margin = torch.tensor([-0.5, -0.2, -1.0], dtype=torch.float64)
    total = 0.0
    for b in range(2):
        for c in range(3):
            m = margin[c].item()
            for h in range(2):
                for w in range(2):
                    sv, tv = s[b, c, h, w].item(), t[b, c, h, w].item()
                    target = max(tv, m)  # margin ReLU
                    if not (sv <= target <= 0):  # partial L2
                        total += (sv - target) ** 2
    assert ofd_loss(s, t, margin).item() == pytest.approx(total / 2, rel=1e-12)


def test_ofd_loss_pools_a_larger_teacher_and_is_zero_below_a_negative_target():
    torch.manual_seed(9)
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    margin = torch.full((3,), -0.4, dtype=torch.float64)
    assert ofd_loss(s, t, margin).item() == pytest.approx(ofd_loss(s, block_mean(t, 4), margin).item(), rel=1e-12)
    below = torch.full((1, 3, 2, 2), -5.0, dtype=torch.float64)
    assert ofd_loss(below, torch.full((1, 3, 2, 2), -0.1, dtype=torch.float64), margin).item() == 0.0
    assert ofd_stage_weights(3) == [0.25, 0.5, 1.0] and ofd_stage_weights(1) == [1.0]


def test_ofd_connector_shapes_initialisation_and_gradients():
    torch.manual_seed(10)
    for kernel in (1, 3):
        connector = OFDConnector(16, 64, kernel_size=kernel)
        assert connector(torch.randn(2, 16, 8, 8)).shape == (2, 64, 8, 8)
        assert torch.equal(connector.bn.weight, torch.ones(64)) and torch.equal(connector.bn.bias, torch.zeros(64))
        assert connector.conv.bias is None
        expected_std = math.sqrt(2.0 / (kernel * kernel * 64))
        assert connector.conv.weight.std().item() == pytest.approx(expected_std, rel=0.1)
    connector = OFDConnector(4, 6)
    s = torch.randn(3, 4, 5, 5, requires_grad=True)
    ofd_loss(connector(s), torch.randn(3, 6, 5, 5), torch.full((6,), -0.3)).backward()
    assert s.grad.abs().sum() > 0 and connector.conv.weight.grad.abs().sum() > 0


def test_ofd_bad_input_raises_one_clear_error():
    with pytest.raises(ValueError, match="odd"):
        OFDConnector(4, 4, kernel_size=2)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        OFDConnector(4, 6)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="one margin per channel"):
        ofd_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="same B and C"):
        ofd_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="two \\(C,\\) tensors"):
        ofd_margin(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="affine BatchNorm"):
        margin_from_batchnorm(torch.nn.BatchNorm2d(3, affine=False))


# ------------------------------------------------------------------------------------------------------ ReviewKD


def test_hcl_loss_matches_the_pyramid_by_hand():
    torch.manual_seed(11)
    pairs = [(8, [(4, 0.5), (2, 0.25), (1, 0.125)]), (4, [(2, 0.5), (1, 0.25)]), (2, [(1, 0.5)]), (1, [])]
    student = [torch.randn(2, 3, h, h, dtype=torch.float64) for h, _ in pairs]
    teacher = [torch.randn(2, 3, h, h, dtype=torch.float64) for h, _ in pairs]
    expected = 0.0
    for (h, levels), fs, ft in zip(pairs, student, teacher):
        loss = ((fs - ft) ** 2).mean().item()
        for size, weight in levels:
            loss += weight * ((block_mean(fs, size) - block_mean(ft, size)) ** 2).mean().item()
        expected += loss / (1 + sum(w for _, w in levels))
    assert hcl_loss(student, teacher).item() == pytest.approx(expected, rel=1e-12)


SHUFFLEV1_FROM_RESNET32X4 = (
    [(240, 16, 16), (480, 8, 8), (960, 4, 4), (960, 1, 1)],
    [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1)],
)
MOBILENETV2_FROM_VGG13 = (
    [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), (1280, 1, 1)],
    [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512, 1, 1)],
)
RESNET20_FROM_RESNET56 = (
    [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 1, 1)],
    [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 1, 1)],
)


@pytest.mark.parametrize("student_shapes, teacher_shapes", [SHUFFLEV1_FROM_RESNET32X4, MOBILENETV2_FROM_VGG13,
                                                            RESNET20_FROM_RESNET56])
def test_reviewkd_fusion_outputs_take_the_teacher_shapes(student_shapes, teacher_shapes):
    torch.manual_seed(12)
    fusion = ReviewKDFusion(student_shapes, teacher_shapes)
    assert fusion.mid_channels == min(512, student_shapes[-1][0])
    assert fusion.abfs[0].att_conv is None and all(abf.att_conv is not None for abf in fusion.abfs[1:])
    assert fusion.abfs[0].conv1[0].in_channels == student_shapes[-1][0]  # deepest first
    features = [torch.randn(2, *s) for s in student_shapes[:-1]] + [torch.randn(2, student_shapes[-1][0])]
    outputs = fusion(features)
    assert [tuple(o.shape[1:]) for o in outputs] == [tuple(t) for t in teacher_shapes]
    teacher = [torch.randn(2, *t) for t in teacher_shapes]
    hcl_loss(outputs, teacher).backward()
    for name, parameter in fusion.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_abf_fuses_with_the_attention_weights():
    torch.manual_seed(13)
    abf = ABF(3, 4, 5, fuse=True).double().eval()  # eval BN with fresh statistics: y = x / sqrt(1 + eps)
    with torch.no_grad():
        abf.att_conv[0].weight.zero_()
        abf.att_conv[0].bias.copy_(torch.tensor([0.0, math.log(3.0)]))  # sigmoid: 1/2 and 3/4
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    residual = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    out, fused = abf(x, residual, (8, 8))
    scale = 1 / math.sqrt(1 + 1e-5)
    transformed = torch.einsum("oc,bchw->bohw", abf.conv1[0].weight[:, :, 0, 0], x) * scale
    upsampled = residual.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    expected = 0.5 * transformed + 0.75 * upsampled
    expected = expected.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # to the teacher's 8×8
    assert torch.allclose(fused, expected, atol=1e-12)
    assert out.shape == (2, 5, 8, 8)
    assert torch.allclose(out, F.conv2d(expected, abf.conv2[0].weight, padding=1) * scale, atol=1e-12)


def test_reviewkd_bad_input_raises_one_clear_error():
    student, teacher = RESNET20_FROM_RESNET56
    with pytest.raises(ValueError, match="one student shape per teacher shape"):
        ReviewKDFusion(student[:-1], teacher)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        ReviewKDFusion([(16, 32)] + student[1:], teacher)
    fusion = ReviewKDFusion(student, teacher)
    features = [torch.randn(2, *s) for s in student[:-1]] + [torch.randn(2, 64)]
    with pytest.raises(ValueError, match="built for 4 student features"):
        fusion(features[1:])
    with pytest.raises(ValueError, match="student feature 1"):
        fusion([features[0], torch.randn(2, 32, 8, 8), *features[2:]])
    with pytest.raises(ValueError, match="pass residual="):
        ABF(3, 4, 5, fuse=True)(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="same shape"):
        hcl_loss([torch.randn(1, 2, 4, 4)], [torch.randn(1, 2, 2, 2)])
    with pytest.raises(ValueError, match="as many student as teacher"):
        hcl_loss([torch.randn(1, 2, 4, 4)], [])
