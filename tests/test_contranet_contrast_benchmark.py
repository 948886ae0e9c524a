"""``benchmarks/contranet_contrast.py``: the score variants from ranked reconstruction distances (synthetic; fast).

The script is loaded from its file (it is not part of the package): ``benchmark_scripts.load_benchmark``.
"""

from __future__ import annotations


import pytest
import torch

from benchmark_scripts import load_benchmark

cc = load_benchmark("contranet_contrast")


def test_variants_compare_the_predicted_labels_distance_with_the_runner_ups():
    # image 0: its own label reconstructs best; image 1: the second label does; image 2: only the fifth does
    d = torch.tensor([[0.2, 0.9, 1.0, 1.1, 1.2],
                      [0.8, 0.3, 1.0, 1.1, 1.2],
                      [0.8, 0.9, 1.0, 1.1, 0.4]])
    v = cc.score_variants(d, [2, 5], [0.5, 1.0])
    assert torch.equal(v["single"], d[:, 0])
    # contrast_k_w = d_1 + w * (2 - min of the runner-ups' distances), the ContraNet layer's contrast score
    assert v["contrast_2_1"].tolist() == pytest.approx([0.2 + 1.1, 0.8 + 1.7, 0.8 + 1.1])
    assert v["contrast_5_1"].tolist() == pytest.approx([0.2 + 1.1, 0.8 + 1.7, 0.8 + 1.6])  # the fifth label counts only with k = 5
    assert v["contrast_2_0.5"].tolist() == pytest.approx([0.2 + 0.55, 0.8 + 0.85, 0.8 + 0.55])
    assert v["ratio_2"].tolist() == pytest.approx([0.2 / 0.9, 0.8 / 0.3, 0.8 / 0.9])
    assert v["ratio_5"][2].item() == pytest.approx(2.0)


def test_the_benchmarks_contrast_is_the_layers_score():
    from mixdefense.layers.contranet import MAX_EMBEDDING_DISTANCE

    d = torch.tensor([[0.3, 0.7, 0.5]])
    assert cc.score_variants(d, [3], [0.5])["contrast_3_0.5"].item() == pytest.approx(
        0.3 + 0.5 * (MAX_EMBEDDING_DISTANCE - 0.5))


def test_a_hard_clean_image_is_not_flagged_by_the_contrast_while_the_single_distance_flags_it():
    # a clean image far from every reconstruction (new sign) vs an AE whose runner-up (its true label) reconstructs well
    hard_clean = torch.tensor([[1.5, 1.9, 2.0]])
    ae = torch.tensor([[0.9, 0.2, 1.5]])
    single = cc.score_variants(torch.cat([hard_clean, ae]), [3])["single"]
    contrast = cc.score_variants(torch.cat([hard_clean, ae]), [3], [1.0])["contrast_3_1"]
    assert single[0] > single[1] and contrast[0] < contrast[1]


def test_rate_carries_a_wilson_interval():
    r = cc.rate(torch.tensor([True] * 3 + [False] * 97))
    assert r["k"] == 3 and r["n"] == 100 and r["rate"] == pytest.approx(0.03)
    assert r["ci95"][0] < 0.03 < r["ci95"][1]


def test_equal_clean_rejection_reads_detection_at_the_selection_quantile():
    cal = {"single": torch.linspace(0, 1, 101)}
    clean = {"single": torch.linspace(0, 1, 101)}
    adv = {"single": torch.tensor([0.995, 0.5, 2.0, 0.1])}
    ones = torch.ones(101, dtype=torch.bool)
    rows, equal = cc.report_rows(cal, ones, clean, ones, {("fgsm", 0.01): (adv, torch.ones(4, dtype=torch.bool))}, [0.01])
    assert equal["single"]["0.01"] == pytest.approx(0.5)  # 0.995 and 2.0 lie above the 99 % quantile (0.99)
    assert equal["single"]["0.05"] == pytest.approx(0.5)
    assert rows[0]["attacks"][0]["detected"]["k"] == 2
