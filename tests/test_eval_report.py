"""The evaluation report: metrics.json with every number, a self-contained HTML page, and what a browser shows."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from markupsafe import escape

from ehrsynth.evaluation.browser import probe_report
from ehrsynth.evaluation.report import HEADLINES, evaluate, write_report

SECTIONS = ["verdict", "headline", "structure", "fidelity", "per-code", "clinical", "utility", "privacy", "raw"]


@pytest.fixture(scope="module")
def gibleed(data_dir):
    from ehrsynth.data.readers.omop import read_omop

    return read_omop(data_dir / "omop-gibleed")


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    """One short real demo run (60 training steps) shared by the page and browser tests."""
    from ehrsynth.pipeline import run_demo

    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    report, rows = run_demo("halo", out / "demo", seed=0, max_steps=60, progress=False, say=lines.append)
    return report, rows, lines


def test_report_holds_every_section_and_number(gibleed, tmp_path):
    marked = dataclasses.replace(gibleed, patient_ids=np.array([f"SECRET-{i}" for i in range(gibleed.n_patients)],
                                                               dtype=object))
    train, test, synthetic = marked.part("train"), marked.part("test"), marked.part("val")
    metrics = evaluate(train, test, synthetic, seed=0, bootstrap=20)
    meta = metrics["_meta"]
    assert (meta["synthetic_patients"], meta["reference_patients"], meta["seed"]) == (215, 215, 0)
    assert meta["privacy_reference_patients"] == [215, 324]   # 539 holdout patients cut for the privacy ceiling
    expected = {"halo", "prevalence", "cmd", "mmd", "structure", "detection", "utility", "membership",
                "attribute", "nnaa", "dcr", "exact_copies"}
    expected |= {"membership_domias", "rare_code_exposure"}  # the privacy-risk attacks (issue 14) have ceilings too
    assert expected <= set(metrics) and expected - {"utility"} == set(metrics["ceiling"])
    # two random parts of the same real data: fidelity high, privacy attack at chance, no structural flaw
    assert metrics["prevalence"]["pearson"] > 0.99 and metrics["ceiling"]["prevalence"]["pearson"] > 0.99
    assert 0.4 <= metrics["membership"]["accuracy"] <= 0.6
    assert metrics["verdict"]["fidelity"]["status"] == "pass"
    interval = metrics["intervals"]["halo.visit_code_r2"]
    assert interval["low"] <= metrics["halo"]["visit_code_r2"] <= interval["high"] and interval["replicates"] == 20
    # a privacy result that could not run shows its reason, never a 0
    metrics["attribute"] = {"metric": "privacy.attribute_inference", "not_applicable": True,
                            "reason": "no code was hidden from the attacker"}
    page = write_report(metrics, train, synthetic, tmp_path, reference=test)
    text = page.read_text()
    assert [m for m in re.findall(r'<section id="([\w-]+)"', text)] == SECTIONS
    assert "not applicable: no code was hidden from the attacker" in text
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 3 and all(len(alt) > 20 and len(data) > 1000 for alt, data in images)
    assert text.count("<figcaption>") == 3
    assert "http://" not in text and "https://" not in text  # opens offline
    for _, label, _, _ in HEADLINES:
        assert label in text
    assert "SECRET-" not in text  # aggregates only: no patient identifier reaches the page
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["halo"]["visit_code_r2"] == pytest.approx(metrics["halo"]["visit_code_r2"])
    keys = saved["figures"]["scatter_keys"]["visit_pair"]
    assert keys["keys"] == metrics["halo"]["n_visit_pair"] and keys["real_only"] > 0  # counted in the caption
    assert f"{keys['real_only']:,} real-only" in text


def test_evaluate_cli_reads_other_formats(gibleed, tmp_path):
    from ehrsynth.data.writers import write_corpus

    gibleed.save(tmp_path / "real")
    (tmp_path / "real" / "descriptions.json").write_text(json.dumps({"OMOP/40481087": "Viral sinusitis"}))
    write_corpus(gibleed.part("val"), tmp_path / "synthetic_omop", "omop")
    out = subprocess.run([sys.executable, "-m", "ehrsynth.cli", "evaluate", "--train", str(tmp_path / "real"),
                          "--test", str(tmp_path / "real"), "--synthetic", str(tmp_path / "synthetic_omop"),
                          "--synthetic-source", "omop", "--out", str(tmp_path / "report"), "--bootstrap", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "report:" in out.stdout and (tmp_path / "report" / "report.html").is_file()
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["intervals"] == {} and metrics["_meta"]["bootstrap"] == 0
    assert metrics["per_code"]["described"] == 1   # the descriptions saved beside --train were found
    bad = subprocess.run([sys.executable, "-m", "ehrsynth.cli", "evaluate", "--train", str(tmp_path / "nope"),
                          "--test", str(tmp_path / "real"), "--synthetic", str(tmp_path / "real"),
                          "--out", str(tmp_path / "report2")], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "report2").exists()


def test_demo_report_page(demo_report):
    report, rows, lines = demo_report
    assert [line[:5] for line in lines if line.startswith("[")] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    text = report.read_text()
    assert len(text.encode()) < 3_000_000
    assert text.index('id="verdict"') < text.index('id="headline"') < text.index('id="structure"')
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert metrics["_meta"]["synthetic_patients"] == 1940 and metrics["_meta"]["train_patients"] == 1940
    assert "likelihood_membership" in metrics and metrics["perplexity_test"]["per_code_perplexity"] > 1
    assert {label for _, label, _, _ in rows} == {label for _, label, _, _ in HEADLINES}
    assert metrics["prevalence"]["pearson"] > 0.9       # even a 60-step model reproduces prevalences closely
    # the structure section puts the synthetic empty-visit share beside the real value 0
    assert metrics["structure"]["empty_visit_share_real"] == 0.0
    row = re.search(r"<td>Empty visits \(share\)</td>(.*?)</tr>", text.split('id="structure"')[1], flags=re.S)
    cells = re.findall(r'<td class="num">([^<]*)</td>', row.group(1))
    assert cells[2] == "0.0000" and len(cells) == 5          # synthetic, interval, real, ceiling, gap
    assert "ceiling (holdout)" in text and " – " in cells[1]
    assert set(metrics["verdict"]) == {"structure", "fidelity", "utility", "privacy"}
    assert all(v["status"] in ("pass", "warn", "fail", "not applicable") for v in metrics["verdict"].values())
    gaps = metrics["per_code"]["prevalence_gaps"]
    assert metrics["per_code"]["described"] == 80 and len(gaps) == 20 and all(r["description"] for r in gaps)
    assert all(str(escape(r["description"])) in text for r in gaps)   # as Jinja escapes it
    assert "Code of the other sex" in text and "Visit before birth" in text


def test_demo_report_in_a_real_browser(demo_report, tmp_path):
    seen = probe_report(demo_report[0])
    assert seen["returncode"] == 0 and seen["errors"] == []
    assert seen["sections"] == SECTIONS
    assert len(seen["images"]) == 3 and all(width > 100 and height > 100 for _, width, height in seen["images"])
    assert all(area in seen["verdict"] for area in ("Structure", "Fidelity", "Utility", "Privacy"))
    # the probe can fail: a broken image has no natural size and reports an error
    broken = tmp_path / "broken.html"
    broken.write_text('<html><head></head><body><section id="verdict"></section>'
                      '<img alt="broken" src="data:image/png;base64,AAAA"></body></html>')
    seen = probe_report(broken)
    assert seen["images"] == [["broken", 0, 0]] and seen["errors"]
