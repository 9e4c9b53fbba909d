"""The evaluation report: metrics.json with every metric, and a self-contained HTML page."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from ehrsynth.evaluation.report import HEADLINES, evaluate, write_report


@pytest.fixture(scope="module")
def gibleed(data_dir):
    from ehrsynth.data.readers.omop import read_omop

    return read_omop(data_dir / "omop-gibleed")


def test_report_holds_every_section_and_image(gibleed, tmp_path):
    marked = dataclasses.replace(gibleed, patient_ids=np.array([f"SECRET-{i}" for i in range(gibleed.n_patients)],
                                                               dtype=object))
    train, test, synthetic = marked.part("train"), marked.part("test"), marked.part("val")
    metrics = evaluate(train, test, synthetic, seed=0)
    assert metrics["_meta"]["synthetic_patients"] == 215 and metrics["_meta"]["seed"] == 0
    expected = {"halo", "prevalence", "cmd", "mmd", "structure", "detection", "utility", "membership",
                "attribute", "nnaa", "dcr", "exact_copies"}
    assert expected <= set(metrics)
    assert all(metrics[k]["metric"] for k in expected)
    # two random parts of the same real data: fidelity high, privacy attack at chance
    assert metrics["prevalence"]["pearson"] > 0.99
    assert 0.4 <= metrics["membership"]["accuracy"] <= 0.6
    page = write_report(metrics, train, synthetic, tmp_path)
    text = page.read_text()
    for section in ("headline", "fidelity", "structure", "utility", "privacy"):
        assert f'id="{section}"' in text
    images = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert {name for name, _ in images} == {"scatter", "histograms", "utility"}
    assert all(len(data) > 1000 for _, data in images)
    assert "http://" not in text and "https://" not in text  # opens offline
    for _, label, _, _ in HEADLINES:
        assert label in text
    assert "SECRET-" not in text  # aggregates only: no patient identifier reaches the page
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["halo"]["visit_code_r2"] == pytest.approx(metrics["halo"]["visit_code_r2"])


def test_evaluate_cli_reads_other_formats(gibleed, tmp_path):
    from ehrsynth.data.writers import write_corpus

    gibleed.save(tmp_path / "real")
    write_corpus(gibleed.part("val"), tmp_path / "synthetic_omop", "omop")
    out = subprocess.run([sys.executable, "-m", "ehrsynth.cli", "evaluate", "--train", str(tmp_path / "real"),
                          "--test", str(tmp_path / "real"), "--synthetic", str(tmp_path / "synthetic_omop"),
                          "--synthetic-source", "omop", "--out", str(tmp_path / "report")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "report:" in out.stdout and (tmp_path / "report" / "report.html").is_file()
    bad = subprocess.run([sys.executable, "-m", "ehrsynth.cli", "evaluate", "--train", str(tmp_path / "nope"),
                          "--test", str(tmp_path / "real"), "--synthetic", str(tmp_path / "real"),
                          "--out", str(tmp_path / "report2")], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "report2").exists()


def test_report_renders_from_a_real_demo_run(tmp_path):
    from ehrsynth.pipeline import run_demo

    lines = []
    report, rows = run_demo("halo", tmp_path / "demo", seed=0, max_steps=60, progress=False, say=lines.append)
    assert report == tmp_path / "demo" / "report" / "report.html"
    assert [line[:5] for line in lines if line.startswith("[")] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    text = report.read_text()
    for section in ("headline", "fidelity", "structure", "utility", "privacy"):
        assert f'id="{section}"' in text
    assert len(re.findall(r'<img alt="\w+" src="data:image/png;base64,', text)) == 3
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert metrics["_meta"]["synthetic_patients"] == 1940 and metrics["_meta"]["train_patients"] == 1940
    assert "likelihood_membership" in metrics and metrics["perplexity_test"]["per_code_perplexity"] > 1
    assert {label for _, label, _, _ in rows} == {label for _, label, _, _ in HEADLINES}
    # even a 60-step model reproduces GiBleed's code prevalences closely
    assert metrics["prevalence"]["pearson"] > 0.9
