"""ContraNet part 2: triplet construction, the embedding net, the detector, its calibration and bundle."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mixdefense.layers.contranet import ContraNet, or_calibrate
from mixdefense.nets import EmbeddingNet, Reconstructor, load_metric, save_metric
from mixdefense.nets.metric import embedding_distance
from mixdefense.triplets import (
    ReferenceBank,
    TripletObjective,
    image_triplets,
    reconstruction_references,
    reference_owners,
    sample_confusable_labels,
    sample_wrong_labels,
)


def tiny_reconstructor(channels: int = 1, classes: int = 10) -> Reconstructor:
    return Reconstructor(channels, 16, classes, 4, (4, 8), (8, 8, 8, 4)).eval()


def tiny_metric(channels: int = 1, dim: int = 6) -> EmbeddingNet:
    return EmbeddingNet(channels, dim, "cnn", (4, 8)).eval()


class Identity(Reconstructor):
    """A 'reconstructor' returning its input: every distance of x to x′ must be 0."""

    def forward(self, x, y):
        return x


# -- triplets -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 4, 9])
def test_wrong_labels_are_distinct_and_never_the_true_label(n):
    y = torch.randint(0, 10, (500,))
    w = sample_wrong_labels(y, 10, n)
    assert w.shape == (500, n)
    assert not (w == y[:, None]).any()
    assert all(len(set(row.tolist())) == n for row in w)
    if n == 9:  # all wrong labels
        assert torch.equal(torch.sort(torch.cat([w, y[:, None]], 1), 1).values, torch.arange(10).expand(500, 10))


def test_wrong_label_count_is_checked():
    with pytest.raises(ValueError, match="wrong labels"):
        sample_wrong_labels(torch.zeros(3, dtype=torch.long), 10, 10)


def test_references_put_true_label_reconstructions_first_then_the_wrong_ones():
    rec = tiny_reconstructor()
    x, y = torch.rand(5, 1, 16, 16), torch.tensor([0, 1, 2, 3, 4])
    refs, labels = reconstruction_references(rec, x, y, 10, 3)
    assert refs.shape == (5 * 4, 1, 16, 16) and labels.shape == (20,)
    assert torch.equal(labels[:5], y)
    assert not (labels[5:].view(5, 3) == y[:, None]).any()  # image i's negatives never carry its label
    torch.testing.assert_close(refs[:5], rec(x, y))
    torch.testing.assert_close(refs[5:8], rec(x[:1].expand(3, -1, -1, -1), labels[5:8]))


def test_latent_noise_draws_one_posterior_latent_per_image_shared_by_its_references():
    rec = tiny_reconstructor()
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    wrong = sample_wrong_labels(y, 10, 2)
    clean, _ = reconstruction_references(rec, x, y, 10, 2, wrong_labels=wrong)
    noisy, labels = reconstruction_references(rec, x, y, 10, 2, wrong_labels=wrong, latent_noise=1.0,
                                              generator=torch.Generator().manual_seed(3))
    assert torch.equal(labels, torch.cat([y, wrong.flatten()]))
    assert not torch.allclose(noisy, clean)
    # the same z = μ + σ·ε for the positive and both negatives of an image
    mu, logvar = rec.encoder(x)
    z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy[:4], rec.generator(z, y))
    torch.testing.assert_close(noisy[4:], rec.generator(z.repeat_interleave(2, 0), wrong.flatten()))
    with pytest.raises(ValueError, match="latent_noise"):
        reconstruction_references(rec, x, y, 10, 2, latent_noise=-0.1)


def test_mined_triplets_never_use_a_negative_with_the_anchor_label():
    emb_a, emb_r = torch.randn(8, 6), torch.randn(8 * 5, 6)
    y = torch.randint(0, 10, (8,))
    refs_labels = torch.cat([y, sample_wrong_labels(y, 10, 4).flatten()])
    obj = TripletObjective(margin=0.7, miner="all")
    a, p, n = obj.miner(emb_a, y, emb_r, refs_labels)
    assert len(a) > 0
    assert torch.equal(refs_labels[p], y[a]) and not (refs_labels[n] == y[a]).any()
    # each anchor's own wrong-label reconstructions are among its candidate negatives
    stats = obj(emb_a, y, emb_r, refs_labels)
    assert stats.num_triplets > 0 and 0 <= stats.active_fraction <= 1 and stats.loss > 0


def test_triplet_loss_vanishes_when_the_margin_is_met():
    y = torch.tensor([0, 1])
    anchors = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    refs = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # positives equal the anchors, negatives at distance 2
    stats = TripletObjective(margin=0.5, miner="all")(anchors, y, refs, y.clone())
    assert stats.num_triplets == 2 and float(stats.loss) == 0.0 and stats.active_fraction == 0.0
    # a negative inside the margin makes the triplet active
    stats = TripletObjective(margin=0.5, miner="all")(anchors, y, torch.tensor([[1.0, 0.0], [0.9, 0.1]]), y.clone())
    assert stats.active_fraction > 0 and float(stats.loss) > 0


def _per_image_batch(num_images=4, negatives=3, dim=6, seed=0):
    """Anchors, references in reconstruction_references' layout, their labels and owners; two images share label 0
    so that a batch-wide pairing would cross images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_images) % 3  # [0, 1, 2, 0, ...]: label 0 on images 0 and 3
    wrong = sample_wrong_labels(y, 10, negatives, g)
    ref_labels = torch.cat([y, wrong.flatten()])
    owners = reference_owners(num_images, negatives)
    return torch.randn(num_images, dim, generator=g), y, torch.randn(len(ref_labels), dim, generator=g), ref_labels, owners


def _set(triplets):
    return set(zip(*(t.tolist() for t in triplets)))


def test_reference_owners_follow_the_reference_layout():
    assert reference_owners(3, 2).tolist() == [0, 1, 2, 0, 0, 1, 1, 2, 2]
    rec = tiny_reconstructor()
    x, y = torch.rand(3, 1, 16, 16), torch.tensor([0, 1, 2])
    refs, labels = reconstruction_references(rec, x, y, 10, 2)
    owners = reference_owners(3, 2)
    for r in range(len(refs)):  # each reference is G(μ(x_owner), its label)
        i = int(owners[r])
        torch.testing.assert_close(refs[r:r + 1], rec(x[i:i + 1], labels[r:r + 1]))


def test_paper_triplets_are_each_images_own_positive_and_wrong_label_reconstructions():
    anchors, y, refs, ref_labels, owners = _per_image_batch()
    a, p, n = image_triplets(y, ref_labels, owners)
    assert len(a) == 4 * 3  # one positive and three negatives per image
    assert torch.equal(owners[p], a) and torch.equal(owners[n], a)  # all from the anchor's own image
    assert torch.equal(p, a)  # the positive is R(x_a, y_a), the a-th reference
    assert torch.equal(ref_labels[p], y[a]) and not (ref_labels[n] == y[a]).any()
    assert _set((a, p, n)) == {(i, i, 4 + 3 * i + j) for i in range(4) for j in range(3)}
    # a miner that keeps everything (margin beyond any L2 distance of unit vectors) keeps exactly these ...
    objective = TripletObjective(margin=0.7, miner="all", miner_margin=10.0, triplets="paper")
    assert _set(objective.mine_per_image(anchors, y, refs, ref_labels, owners)) == _set((a, p, n))
    # ... where the batch mode pairs images 0 and 3 (same label) and uses other images' references
    batch = TripletObjective(margin=0.7, miner="all", miner_margin=10.0).miner(anchors, y, refs, ref_labels)
    assert (owners[batch[1]] != batch[0]).any() and (owners[batch[2]] != batch[0]).any()


def test_paper_mode_semihard_miner_keeps_only_semihard_triplets():
    margin = 0.5
    anchors, y, refs, ref_labels, owners = _per_image_batch(num_images=32, negatives=5, dim=3, seed=1)
    objective = TripletObjective(margin=margin, miner="semihard", triplets="paper")
    mined = objective.mine_per_image(anchors, y, refs, ref_labels, owners)
    a, p, n = mined
    assert torch.equal(owners[p], a) and torch.equal(owners[n], a) and torch.equal(ref_labels[p], y[a])
    assert not (ref_labels[n] == y[a]).any()
    # L2 on unit-normalised embeddings (PML's LpDistance(normalize_embeddings=True)), computed here by hand
    d = torch.cdist(torch.nn.functional.normalize(anchors), torch.nn.functional.normalize(refs))
    d_ap, d_an = d[a, p], d[a, n]
    assert len(a) > 0 and ((d_ap < d_an) & (d_an <= d_ap + margin + 1e-6)).all()
    # and it keeps every such triplet among the per-image candidates, none of the easy or hard ones
    ca, cp, cn = image_triplets(y, ref_labels, owners)
    gap = d[ca, cn] - d[ca, cp]
    semihard = (gap > 0) & (gap <= margin)
    assert (gap <= 0).any() and (gap > margin).any()  # the batch does hold hard and easy triplets
    assert _set(mined) == _set((ca[semihard], cp[semihard], cn[semihard]))
    stats = objective(anchors, y, refs, ref_labels, owners)
    assert stats.num_triplets == 32 * 5 and stats.num_mined == len(a)
    # eq. 6 averaged over the mined triplets with a non-zero loss (PML's AvgNonZeroReducer)
    losses = torch.relu(d_ap - d_an + margin)
    torch.testing.assert_close(stats.loss, losses[losses > 0].mean())


def test_paper_mode_semihard_on_hand_placed_embeddings():
    """One image: the positive at distance ~0.2 from the anchor; negatives closer (hard), a little farther
    (semihard) and far (easy).  Only the semihard one is mined."""
    def unit(deg):
        r = torch.deg2rad(torch.tensor(float(deg)))
        return torch.stack([torch.cos(r), torch.sin(r)])

    anchors = unit(0)[None]
    refs = torch.stack([unit(12), unit(6), unit(30), unit(120)])  # positive, hard, semihard, easy
    y, ref_labels, owners = torch.tensor([0]), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 0, 0])
    objective = TripletObjective(margin=0.5, miner="semihard", triplets="paper")
    assert _set(objective.mine_per_image(anchors, y, refs, ref_labels, owners)) == {(0, 0, 2)}


def test_paper_mode_needs_owners_and_an_own_positive():
    anchors, y, refs, ref_labels, owners = _per_image_batch()
    objective = TripletObjective(triplets="paper")
    with pytest.raises(ValueError, match="ref_owners"):
        objective(anchors, y, refs, ref_labels)
    with pytest.raises(ValueError, match="own true-label"):
        objective(anchors, y, refs[4:], ref_labels[4:], owners[4:])  # the positives left out
    with pytest.raises(ValueError, match="triplets mode"):
        TripletObjective(triplets="pairs")


# -- embedding net --------------------------------------------------------------------------
@pytest.mark.parametrize("arch,channels", [("cnn", 1), ("cnn", 3), ("mobilenet_v2", 1)])
def test_embedding_net_shapes_and_unit_norm(arch, channels):
    m = EmbeddingNet(channels, 12, arch).eval()
    e = m(torch.rand(3, channels, 32, 32))
    assert e.shape == (3, 12)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))


def test_paper_embedding_net_matches_table1_size():
    params = sum(p.numel() for p in EmbeddingNet(3, 12, "mobilenet_v2").parameters())
    assert abs(params / 1e6 - 2.24) < 0.03  # paper Table 1: deep metric model 2.24 M


def test_metric_file_round_trip(tmp_path):
    m = tiny_metric()
    save_metric(m, tmp_path / "m.pt")
    m2 = load_metric(tmp_path / "m.pt")
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(m(x), m2(x))


# -- the detector ---------------------------------------------------------------------------
def test_distances_are_zero_for_identical_embeddings_and_non_negative():
    a = torch.randn(5, 7)
    for name in ("l2", "cosine"):
        assert torch.allclose(embedding_distance(a, a.clone(), name), torch.zeros(5), atol=1e-6)
        assert (embedding_distance(a, torch.randn(5, 7), name) >= 0).all()


def test_scores_are_non_negative_and_zero_for_a_perfect_reconstruction():
    x, y = torch.rand(4, 1, 16, 16), torch.randint(0, 10, (4,))
    perfect = ContraNet(Identity(1, 16, 10, 4, (4, 8), (8, 8, 8, 4)), tiny_metric(), ("metric", "l2", "ssim"))
    for name, s in perfect.score_components(x, y).items():
        assert torch.allclose(s, torch.zeros(4), atol=1e-5), name
    real = ContraNet(tiny_reconstructor(), tiny_metric(), ("metric", "l2", "ssim"))
    for s in real.score_components(x, y).values():
        assert (s >= 0).all()


def test_decision_follows_the_stored_threshold():
    det = ContraNet(tiny_reconstructor(), tiny_metric())
    x, y = torch.rand(16, 1, 16, 16), torch.randint(0, 10, (16,))
    with pytest.raises(RuntimeError, match="not calibrated"):
        det(x, y)
    s = det.score(x, y)
    t = s.median()
    det.thresholds.fill_(float(t))
    assert torch.equal(det(x, y), s > t)
    det.thresholds.fill_(float(s.max()))
    assert not det(x, y).any()


def test_calibration_meets_the_target_rate_and_or_combination_stays_under_it():
    torch.manual_seed(1)
    det = ContraNet(tiny_reconstructor(), tiny_metric(), ("metric", "ssim"))
    x, y = torch.rand(400, 1, 16, 16), torch.randint(0, 10, (400,))
    cal = det.calibrate(x, y, target_frr=0.05)
    assert cal.achieved_frr <= 0.05 and cal.achieved_frr >= 0.03
    assert det(x, y).float().mean().item() == pytest.approx(cal.achieved_frr)
    assert all(f <= 0.05 for f in cal.per_score_frr)
    s = det.score(x, y)  # max_k s_k / t_k: rejected iff > 1
    assert torch.equal(s > 1, det(x, y))


def test_or_calibrate_on_independent_scores():
    scores = torch.rand(10_000, 2)
    t, q = or_calibrate(scores, 0.05)
    frr = (scores > t).any(1).float().mean().item()
    assert 0.045 <= frr <= 0.05 + 1e-6 and 0.02 < q < 0.03  # two independent scores: 1 − (1 − q)² ≈ 0.05


def test_state_dict_and_bundle_round_trip(tmp_path):
    det = ContraNet(tiny_reconstructor(), tiny_metric())
    x, y = torch.rand(50, 1, 16, 16), torch.randint(0, 10, (50,))
    det.calibrate(x, y, 0.1)
    other = ContraNet(tiny_reconstructor(), tiny_metric())
    other.load_state_dict(det.state_dict())
    assert torch.equal(other.thresholds, det.thresholds)
    torch.testing.assert_close(other.score(x, y), det.score(x, y))
    det.save(tmp_path / "c.pt")
    loaded = ContraNet.load(tmp_path / "c.pt")
    assert torch.equal(loaded(x, y), det(x, y)) and loaded.calibration == det.calibration


def test_detect_uses_the_predicted_label_without_a_gradient_path_into_the_classifier():
    det = ContraNet(tiny_reconstructor(), tiny_metric())
    det.thresholds.fill_(0.5)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 10))
    x = torch.rand(6, 1, 16, 16)
    rejected, score, y_pred = det.detect(x, classifier)
    assert torch.equal(y_pred, classifier(x).argmax(1)) and not y_pred.requires_grad
    assert torch.equal(rejected, score > 0.5)
    # the score is differentiable in x (adaptive attacks), and touches no classifier weight
    x.requires_grad_(True)
    det.score(x, y_pred).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in classifier.parameters())


def test_inputs_are_validated():
    det = ContraNet(tiny_reconstructor(), tiny_metric())
    with pytest.raises(ValueError, match="channel"):
        det.score(torch.rand(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        det.score(torch.rand(2, 1, 16, 16) + 1, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        det.score(torch.rand(2, 1, 16, 16), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="needs an embedding net"):
        ContraNet(tiny_reconstructor(), None, ("metric",))


def test_inputs_of_another_size_are_resized_to_the_cgan():
    det = ContraNet(tiny_reconstructor(), tiny_metric(), ("l2",))
    assert det.score(torch.rand(3, 1, 14, 14), torch.zeros(3, dtype=torch.long)).shape == (3,)


def test_confusable_labels_come_from_the_classifiers_top_wrong_labels_and_never_the_true_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 43, generator=g)
    y = logits.argmax(1)  # the true label scores highest, as on clean training images
    w = sample_confusable_labels(logits, y, 6, 3, 5, generator=g)
    assert w.shape == (64, 6) and not (w == y[:, None]).any()
    assert all(len(set(row.tolist())) == 6 for row in w)  # distinct per image
    masked = logits.clone()
    masked[torch.arange(64), y] = -torch.inf
    top5 = masked.topk(5, dim=1).indices
    assert all(set(w[i, :3].tolist()) <= set(top5[i].tolist()) for i in range(64))
    # the true label ranked anywhere: still never sampled
    y_low = logits.argmin(1)
    assert not (sample_confusable_labels(logits, y_low, 42, 5, 5, generator=g) == y_low[:, None]).any()
    with pytest.raises(ValueError, match="n_confusable"):
        sample_confusable_labels(logits, y, 4, 5, 3)


# -- reference bank ---------------------------------------------------------------------
def _bank(classifier=None, top_k=0, uniform=3, n=12):
    rec = tiny_reconstructor()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 16, 16, generator=g), torch.arange(n) % 10
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    return rec, x, y, ReferenceBank.build(rec, batches, 10, uniform, classifier=classifier, top_k=top_k,
                                          generator=g, progress=False)


def test_reference_bank_holds_the_cgans_reconstructions_of_true_confusable_and_uniform_labels():
    clf = nn.Sequential(nn.Flatten(), nn.Linear(256, 10)).eval()
    rec, x, y, bank = _bank(clf, top_k=4, uniform=3)
    assert len(bank) == 12 and bank.labels.shape == (12, 8) and bank.num_confusable == 4 and bank.num_uniform == 3
    assert torch.equal(bank.labels[:, 0], y)
    assert not (bank.labels[:, 1:] == y[:, None]).any()
    assert all(len(set(row.tolist())) == 8 for row in bank.labels)  # distinct per image
    masked = clf(x).detach()
    masked[torch.arange(12), y] = -torch.inf
    top4 = masked.topk(4, 1).indices
    assert all(set(bank.labels[i, 1:5].tolist()) == set(top4[i].tolist()) for i in range(12))
    expected = rec(x.repeat_interleave(8, 0), bank.labels.flatten()).view(12, 8, 1, 16, 16)
    torch.testing.assert_close(bank.references.float(), expected, atol=1e-3, rtol=0)  # float16 storage


def test_reference_bank_samples_in_the_layout_of_reconstruction_references():
    clf = nn.Sequential(nn.Flatten(), nn.Linear(256, 10)).eval()
    _, x, y, bank = _bank(clf, top_k=4, uniform=3)
    index = torch.tensor([7, 2, 2, 11])
    refs, labels = bank.sample(index, 4, 3, torch.Generator().manual_seed(1))
    assert refs.dtype == torch.float32 and refs.shape == (4 * 5, 1, 16, 16) and labels.shape == (20,)
    assert torch.equal(labels[:4], y[index])
    torch.testing.assert_close(refs[:4], bank.references[index, 0].float())
    negatives = labels[4:].view(4, 4)
    for row, i in zip(negatives, index.tolist()):
        assert set(row[:3].tolist()) <= set(bank.labels[i, 1:5].tolist())  # confusable columns
        assert row[3].item() in bank.labels[i, 5:].tolist()  # a uniform column
        assert len(set(row.tolist())) == 4 and y[i].item() not in row.tolist()
    # image 7's third negative is the bank's reconstruction with that label
    col = bank.labels[7].tolist().index(negatives[0, 2].item())
    torch.testing.assert_close(refs[4 + 2], bank.references[7, col].float())
    with pytest.raises(ValueError, match="uniform negatives"):
        bank.sample(index, 4, 0)  # 4 uniform negatives asked, 3 held


def test_reference_bank_refuses_images_that_are_not_its_own():
    _, x, y, bank = _bank()
    index = torch.tensor([0, 3])
    bank.check(index, x[index])
    with pytest.raises(RuntimeError, match="augment"):
        bank.check(index, x[index].roll(1, -1) * 0.9)
    with pytest.raises(ValueError, match="classifier"):
        ReferenceBank.build(tiny_reconstructor(), [(x, y)], 10, 3, top_k=2)


# -- contrast with the runner-up labels (MixDefense+) -------------------------------------------
def _fixed_classifier(order: list[int], classes: int = 10) -> nn.Module:
    """A classifier whose logits rank the labels as ``order`` (most likely first) for every image."""
    logits = torch.zeros(classes)
    for rank, label in enumerate(order):
        logits[label] = float(classes - rank)

    class Fixed(nn.Module):
        def forward(self, x):
            return logits.expand(x.shape[0], classes).clone()

    return Fixed().eval()


class LabelShifted(Reconstructor):
    """A cGAN whose reconstruction from label ``j`` is ``x`` shifted by ``j / 20`` (label 0: ``x`` itself)."""

    class Encoder(nn.Module):
        def forward(self, x):
            return x, None

    class Generator(nn.Module):
        def forward(self, latent, y):
            return (latent + y.view(-1, 1, 1, 1) / 20).clamp(0, 1)

    def __init__(self):
        super().__init__(1, 16, 10, 4, (4, 8), (8, 8, 8, 4))
        self.encoder, self.generator = self.Encoder(), self.Generator()


class Flat(nn.Module):
    """An 'embedding net' that flattens (ContraNet's distance normalises the rows)."""

    in_channels = 1

    def forward(self, x):
        return x.flatten(1)


def test_contrast_score_is_the_own_distance_plus_the_weighted_closeness_of_the_best_runner_up():
    rec, metric = LabelShifted(), Flat()  # label j reconstructs x shifted by j / 20: distances grow with j
    det = ContraNet(rec, metric, contrast_labels=3, contrast_weight=0.5).bind(_fixed_classifier([4, 7, 1, 0]))
    x, y = torch.rand(5, 1, 16, 16) * 0.5, torch.full((5,), 4)
    # runner-ups: the two most likely labels other than y (7 and 1), most likely first
    assert det.runner_up_labels(x, y).tolist() == [[7, 1]] * 5

    def dist(label):
        return embedding_distance(metric(x), metric(rec(x, torch.full((5,), label))))

    assert (dist(1) < dist(7)).all()  # the closer runner-up counts
    expected = dist(4) + 0.5 * (2.0 - torch.minimum(dist(7), dist(1)))
    torch.testing.assert_close(det.score(x, y), expected)
    # y is never its own runner-up: with y = 7 the runner-ups are 4 and 1
    assert det.runner_up_labels(x, torch.full((5,), 7)).tolist() == [[4, 1]] * 5
    assert (det.score(x, y) >= 0).all()


def test_contrast_of_one_label_is_the_papers_score_and_weight_zero_is_too():
    rec, metric = tiny_reconstructor(), tiny_metric()
    x, y = torch.rand(4, 1, 16, 16), torch.randint(0, 10, (4,))
    paper = ContraNet(rec, metric).score(x, y)
    torch.testing.assert_close(ContraNet(rec, metric, contrast_labels=1).score(x, y), paper)  # no classifier needed
    zero = ContraNet(rec, metric, contrast_labels=2, contrast_weight=0.0).bind(_fixed_classifier([0, 1]))
    torch.testing.assert_close(zero.score(x, y), paper)


def test_contrast_rises_when_a_runner_up_reconstructs_the_image_better():
    x, y = torch.rand(8, 1, 16, 16) * 0.5, torch.full((8,), 5)  # label 5's reconstruction is far from x
    near = ContraNet(LabelShifted(), Flat(), contrast_labels=2, contrast_weight=1.0).bind(_fixed_classifier([5, 0]))
    far = ContraNet(LabelShifted(), Flat(), contrast_labels=2, contrast_weight=1.0).bind(_fixed_classifier([5, 9]))
    paper = ContraNet(LabelShifted(), Flat()).score(x, y)
    # runner-up 0 reconstructs x exactly (distance 0): the full weight 2·w is added; runner-up 9 adds less
    torch.testing.assert_close(near.score(x, y), paper + 2.0)
    assert (far.score(x, y) < near.score(x, y)).all() and (far.score(x, y) > paper).all()


def test_contrast_needs_a_bound_classifier_and_valid_settings(tmp_path):
    rec, metric = tiny_reconstructor(), tiny_metric()
    det = ContraNet(rec, metric, contrast_labels=2)
    with pytest.raises(RuntimeError, match="bind"):
        det.score(torch.rand(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    for bad in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match="contrast_labels"):
            ContraNet(rec, metric, contrast_labels=bad)
    with pytest.raises(ValueError, match="contrast_weight"):
        ContraNet(rec, metric, contrast_labels=2, contrast_weight=-0.1)
    with pytest.raises(ValueError, match="'metric'"):
        ContraNet(rec, metric, scores=("ssim",), contrast_labels=2)


def test_contrast_settings_survive_the_file_and_detect_binds_its_classifier(tmp_path):
    rec, metric = tiny_reconstructor(), tiny_metric()
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 10))
    x = torch.rand(30, 1, 16, 16)
    det = ContraNet(rec, metric, contrast_labels=3, contrast_weight=0.25)
    det.thresholds.fill_(1.0)
    rejected, score, y_pred = det.detect(x, classifier)  # binds the classifier it is given
    det.save(tmp_path / "c.pt")
    loaded = ContraNet.load(tmp_path / "c.pt", classifier)
    assert (loaded.contrast_labels, loaded.contrast_weight) == (3, 0.25)
    torch.testing.assert_close(loaded.score(x, y_pred), score)
    # a file written before the option loads as the paper's score
    payload = det.payload()
    del payload["contrast_labels"], payload["contrast_weight"]
    assert ContraNet.from_payload(payload).contrast_labels == 1
    # the score stays differentiable in x, with no gradient into the classifier (the ranking is under no_grad)
    x.requires_grad_(True)
    loaded.score(x, y_pred).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in classifier.parameters())
