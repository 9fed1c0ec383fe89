import numpy as np
import pyarrow.parquet as pq
import pytest

from bpsim.synthetic import (SyntheticSpec, capped_geometric_pmf, expected_accepted, synthetic_trace,
                             table_metadata, write_synthetic)


def test_synthetic_follows_capped_geometric():
    table = synthetic_trace(requests=100, rounds_per_request=200, acceptance=0.7, draft_len=5, seed=1)
    accepted = table.column("accepted").to_numpy()
    observed = np.bincount(accepted, minlength=6) / len(accepted)
    # 20 000 rounds: each frequency has a standard error below 0.0035.
    np.testing.assert_allclose(observed, capped_geometric_pmf(0.7, 5), atol=0.015)


def test_synthetic_columns_consistent():
    table = synthetic_trace(requests=3, rounds_per_request=5, draft_len=(0, 2, 4), seed=2)
    draft_len = table.column("draft_len").to_numpy()
    accepted = table.column("accepted").to_numpy()
    emitted = table.column("emitted").to_numpy()
    assert (accepted <= draft_len).all()
    assert (emitted == accepted + 1).all()
    assert [len(x) for x in table.column("tokens").to_pylist()] == emitted.tolist()
    assert [len(x) for x in table.column("draft_max_prob").to_pylist()] == draft_len.tolist()
    tokens = table.column("tokens").to_pylist()
    drafts = table.column("draft_tokens").to_pylist()
    for row_tokens, row_drafts, k in zip(tokens, drafts, accepted):
        assert row_tokens[:k] == row_drafts[:k]
        if k < len(row_drafts):
            assert row_tokens[k] != row_drafts[k]
    position = table.column("position").to_numpy()
    assert position[0] == 0
    assert position[5] == 0  # first round of the second request
    assert position[1] == emitted[0]
    assert table.column("finished").to_pylist().count(True) == 3


def test_synthetic_extremes_and_seed():
    assert (synthetic_trace(acceptance=1.0, draft_len=3).column("accepted").to_numpy() == 3).all()
    assert (synthetic_trace(acceptance=0.0, draft_len=3).column("accepted").to_numpy() == 0).all()
    first = synthetic_trace(seed=5, request_concentration=10.0, confidence_strength=2.0)
    second = synthetic_trace(seed=5, request_concentration=10.0, confidence_strength=2.0)
    assert first.equals(second)
    assert expected_accepted(0.5, 3) == pytest.approx(0.5 + 0.25 + 0.125)


def test_synthetic_confidence_correlates():
    table = synthetic_trace(requests=50, rounds_per_request=100, draft_len=1, confidence_strength=2.0, seed=3)
    first_prob = np.array([x[0] for x in table.column("draft_max_prob").to_pylist()])
    accepted = table.column("accepted").to_numpy()
    assert first_prob[accepted == 1].mean() > first_prob[accepted == 0].mean() + 0.05


def test_write_synthetic_metadata(tmp_path):
    path = write_synthetic(tmp_path / "t.parquet", SyntheticSpec(requests=2), mode="sample")
    metadata = table_metadata(pq.read_table(path))
    assert metadata["sampling"]["mode"] == "sample"
    assert metadata["synthetic"]["requests"] == 2


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="acceptance"):
        SyntheticSpec(acceptance=1.5)
    with pytest.raises(ValueError, match="draft_len"):
        SyntheticSpec(draft_len=(-1,))
