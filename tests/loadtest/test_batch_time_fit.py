"""`python -m loadtest.batch_time_fit`: slai-plus's batch-time model against the H100 probe."""

import csv

import numpy as np

from loadtest.batch_time_fit import DEFAULT, fit_errors, main


def _rows():
    with DEFAULT.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["source"] == "vidur_grid"]


def test_the_five_term_model_fits_the_gpu_measurements_better_than_three_terms():
    rows = _rows()
    five, three = fit_errors(rows, "split_graph_iter_ms", 5), fit_errors(rows, "split_graph_iter_ms", 3)
    assert len(five) == len(rows) == 135
    assert np.abs(five).mean() < np.abs(three).mean() and np.abs(five).mean() < 0.05


def test_the_command_prints_the_table(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "| all five (slai-plus) |" in out and "of 100 |" in out


def test_learned_prints_what_slai_plus_learns_beside_the_profile(capsys):
    assert main(["--learned", "rtx6000ada-mistral7b", "--requests", "150", "--qps", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "| rtx6000ada-mistral7b | profile | 1.8668e-02" in out and "| | learned |" in out
