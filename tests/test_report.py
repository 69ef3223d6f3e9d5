"""The study report (analysis/report.py) from a real MLflow sqlite store holding known runs and artifacts.

Every expected number is computed here from the raw values logged (statistics, sorted()), never by
analysis/. One test opens the page in a real headless Chromium and checks that it renders.
"""
from __future__ import annotations

import base64
import html
import io
import os
import random
import statistics
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from commands import run_command

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from PIL import Image  # noqa: E402

import analysis  # noqa: E402
from analysis.__main__ import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT, EMPTY, K = "study", "nothing", 3
T0 = 1_700_000_000_000  # ms
PLANNED = 40  # the parent run's "trials" param: more than were recorded
METRICS = ("factor_score", "mig", "mig_sup", "recon_error")
# (dataset, family, beta) -> seeds that FINISHED, and each family's value ranges: pro_vlae leads MIG, vlae
# leads MIG-sup, so the paper's ordering holds on MIG and fails on MIG-sup (checked on RAW below).
CELLS = {("dsprites", f, b): range(4) for f in ("beta_vae", "vlae", "pro_vlae") for b in (1.0, 4.0)}
CELLS[("dsprites", "teacher_student", 1.0)] = range(4)
CELLS[("shapes3d", "pro_vlae", 1.0)] = range(2)  # an incomplete cell
CELLS[("shapes3d", "vlae", 1.0)] = range(3)
RANGES = {"beta_vae": {"mig": (0.05, 0.15), "mig_sup": (0.05, 0.15)},
          "vlae": {"mig": (0.25, 0.35), "mig_sup": (0.60, 0.70)},
          "pro_vlae": {"mig": (0.50, 0.60), "mig_sup": (0.40, 0.50)},
          "teacher_student": {"mig": (0.0, 0.05), "mig_sup": (0.0, 0.05)}}
HARDWARE = "cpu: 2 threads, x86_64 (test host)"
ERROR = 'RuntimeError: <img src="x" alt="injected"> & <b>more</b>'


def raw_values() -> dict:
    rng = random.Random(12)
    raw = {}
    for cell, seeds in CELLS.items():
        ranges = RANGES[cell[1]]
        raw[cell] = {s: {"mig": round(rng.uniform(*ranges["mig"]), 4),
                         "mig_sup": round(rng.uniform(*ranges["mig_sup"]), 4),
                         "factor_score": round(rng.uniform(0.4, 1.0), 4),
                         "recon_error": round(rng.uniform(20.0, 200.0), 3)} for s in seeds}
    return raw


RAW = raw_values()


def top3(cell, metric, raw=RAW):
    """(mean, sample std or None) of the K best seeds of a cell by ``metric`` itself."""
    seeds = raw[cell]
    sign = 1 if metric == "recon_error" else -1
    values = sorted((seeds[s][metric] for s in seeds), key=lambda v: sign * v)[:K]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def family_best(dataset, metric, raw=RAW) -> list[tuple[str, float]]:
    """(family, its best top-3 mean over β), best family first."""
    pick = min if metric == "recon_error" else max
    best = {}
    for cell in raw:
        if cell[0] == dataset:
            value = top3(cell, metric, raw)[0]
            best[cell[1]] = pick(best.get(cell[1], value), value)
    return sorted(best.items(), key=lambda item: item[1], reverse=pick is max)


def best_run_cell(dataset, family, raw=RAW):
    """(beta, seed) of the family's finished run with the highest MIG-sup."""
    runs = [(v["mig_sup"], cell[2], s) for cell, seeds in raw.items() if cell[:2] == (dataset, family)
            for s, v in seeds.items()]
    _, beta, seed = max(runs)
    return beta, seed


def png(seed: int) -> bytes:
    """A small PNG, different for every seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", (40 + seed % 17, 30), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


NEW_LAYOUT = [f"figures/stage{s}/{kind}.png" for s in range(3) for kind in ("information", "traversal")]
NEW_LAYOUT += ["figures/information.png", "figures/traversal.png", "figures/traversal_z1.png"]
OLD_LAYOUT = ["figures/information_per_stage.png"] + [f"figures/{kind}_z{l}.png" for l in (1, 2, 3)
                                                      for kind in ("traversal", "prior")]


def log_files(client, run_id: str, paths: list[str], folder: Path) -> dict[str, bytes]:
    logged = {}
    for i, path in enumerate(paths):
        data = png(zlib.crc32(f"{run_id}/{path}".encode()) % 10_000 + i)
        local = folder / run_id / path
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        client.log_artifact(run_id, str(local), str(Path(path).parent))
        logged[path] = data
    return logged


def params(dataset, family, beta, seed) -> list[Param]:
    values = {"family": family, "dataset": dataset, "beta": str(beta), "seed": str(seed), "levels": "3",
              "z_dim": "2", "device": "cpu", "steps_per_stage": "100"}
    return [Param(k, v) for k, v in values.items()]


def trial(client, exp_id, parent, sweep, cell, seed, finals, status="FINISHED", start=T0, mi=False):
    dataset, family, beta = cell
    tags = {"mlflow.parentRunId": parent, "provlae.role": "trial", "family": family, "dataset": dataset,
            "sweep": sweep, "hardware": HARDWARE}
    name = f"{family}-{dataset}-b{beta:g}-s{seed}"
    run = client.create_run(exp_id, start_time=start, run_name=name, tags=tags)
    metrics = [Metric(k, v, start, 300) for k, v in finals.items()]
    if mi:  # I(x; z_l) at each of three stage ends: the report draws its own Fig. 5 from these
        metrics += [Metric(f"mi_z{l}", 1.0 + l + st, start, 100 * st + 99)
                    for st in range(3) for l in (1, 2, 3)]
        metrics += [Metric("stage", float(st), start, 100 * st) for st in range(3)]
    client.log_batch(run.info.run_id, metrics=metrics, params=params(dataset, family, beta, seed))
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status, end_time=start + 20_000)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    client.create_experiment(EMPTY)
    parent = client.create_run(exp_id, start_time=T0, run_name="main",
                               tags={"provlae.role": "sweep", "sweep": "main"}).info.run_id
    described = {"preset": "smoke", "betas": "1,4", "seeds": "0,1,2,3", "trials": str(PLANNED), "fuse": "1"}
    client.log_batch(parent, params=[Param(k, v) for k, v in described.items()])
    ids, n = {}, 0
    best = {(d, f): best_run_cell(d, f) for d, f, _ in CELLS}
    for cell, seeds in RAW.items():
        for seed, finals in seeds.items():
            n += 1
            mi = (cell[0], cell[1]) == ("dsprites", "pro_vlae") and best[cell[:2]] == (cell[2], seed)
            ids[cell, seed] = trial(client, exp_id, parent, "main", cell, seed, finals,
                                    start=T0 + 1000 * n, mi=mi)
    perfect = {"mig": 0.99, "mig_sup": 0.99, "factor_score": 1.0, "recon_error": 1.0}
    failed = [trial(client, exp_id, parent, "main", ("dsprites", "pro_vlae", 1.0), 4, perfect, "FAILED"),
              trial(client, exp_id, parent, "main", ("dsprites", "beta_vae", 16.0), 0, {}, "FAILED")]
    client.set_tag(failed[0], "error", ERROR)  # shown on the page: as text, never as markup
    running = trial(client, exp_id, parent, "main", ("dsprites", "vlae", 4.0), 4, perfect, "RUNNING")
    client.set_terminated(parent, "FAILED", end_time=T0 + 600_000)
    # A second sweep in the same experiment: pooled only without --sweep.
    other = client.create_run(exp_id, start_time=T0, run_name="other",
                              tags={"provlae.role": "sweep", "sweep": "other"}).info.run_id
    extra = {"mig": 0.345, "mig_sup": 0.95, "factor_score": 0.5, "recon_error": 50.0}
    extra_id = trial(client, exp_id, other, "other", ("dsprites", "vlae", 1.0), 9, extra, start=T0)
    client.set_terminated(other, "FINISHED", end_time=T0 + 60_000)

    def best_id(family: str) -> str:
        beta, seed = best["dsprites", family]
        return ids[("dsprites", family, beta), seed]

    artifacts = {"pro_vlae": log_files(client, best_id("pro_vlae"), NEW_LAYOUT, root),
                 "vlae": log_files(client, best_id("vlae"), OLD_LAYOUT, root),
                 "other": log_files(client, extra_id, OLD_LAYOUT[:2], root)}
    return {"uri": uri, "client": client, "ids": ids, "best": best, "failed": failed, "running": running,
            "extra": extra_id, "artifacts": artifacts, "exp_id": exp_id, "parent": parent}


class Page(HTMLParser):
    """The parts of the report a test reads: tables (by id), images, ordering items, run sections."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.images, self.orderings, self.runs = {}, [], [], []
        self._table = self._row = self._cell = self._li = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {"attrs": attrs, "text": ""}
            self._row.append(self._cell)
        elif tag == "img":
            self.images.append({**attrs, "run": self.runs[-1]["data-run-id"] if self.runs else None})
        elif tag == "li" and "ordering" in attrs.get("class", ""):
            self._li = {**attrs, "text": ""}
            self.orderings.append(self._li)
        elif tag == "section" and "data-run-id" in attrs:
            self.runs.append(attrs)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "tr":
            self._row = None
        elif tag in ("td", "th"):
            self._cell = None
        elif tag == "li":
            self._li = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._li is not None:
            self._li["text"] += data


def report(store, out: Path, **kwargs) -> tuple[Path, Page]:
    path = analysis.write_report(EXPERIMENT, out, tracking_uri=store["uri"], **kwargs)
    return path, Page(path.read_text(encoding="utf-8"))


def sweep_facts(page: Page) -> dict[str, dict]:
    """Field name -> the sweep column's cell (first sweep) of the 'What was run' table."""
    rows = page.tables["sweeps"]
    return {row[0]["text"]: row[1] for row in rows[1:]}


def test_report_numbers_are_the_top3_and_the_verdicts(store, tmp_path):
    path, page = report(store, tmp_path / "out", sweep="main")
    assert path == tmp_path / "out" / "index.html"
    for dataset in ("dsprites", "shapes3d"):
        rows = page.tables[f"topk-{dataset}"][1:]
        cells = sorted(c for c in RAW if c[0] == dataset)
        assert len(rows) == len(cells)
        for row in rows:
            family, beta = row[0]["text"], float(row[1]["text"])
            metric_cells = [c for c in row if "data-metric" in c["attrs"]]
            assert {c["attrs"]["data-metric"] for c in metric_cells} == set(METRICS)
            for cell in metric_cells:
                mean, std = top3((dataset, family, beta), cell["attrs"]["data-metric"])
                assert float(cell["attrs"]["data-mean"]) == pytest.approx(mean, rel=1e-12)
                if std is None:
                    assert "data-std" not in cell["attrs"]
                else:
                    assert float(cell["attrs"]["data-std"]) == pytest.approx(std, rel=1e-9)
                assert f"{mean:.4g}" in cell["text"]
            assert row[-1]["text"] == ("incomplete" if len(CELLS[dataset, family, beta]) < K else "")

    # The paper's ordering: computed here from RAW (the data are built so that both answers occur).
    want = {}
    for metric in ("mig", "mig_sup"):
        best = dict(family_best("dsprites", metric))
        want["dsprites", metric] = "holds" if best["pro_vlae"] > best["vlae"] > best["beta_vae"] else "fails"
        want["shapes3d", metric] = "unknown"  # no beta_vae there
    assert set(want.values()) == {"holds", "fails", "unknown"}
    got = {(li["data-dataset"], li["data-metric"]): li["data-holds"] for li in page.orderings}
    assert got == want
    assert "beta_vae" in next(li["text"] for li in page.orderings if li["data-holds"] == "unknown")

    # The leaders of the comparison table, each family at its best β.
    for row in page.tables["compare-dsprites"][1:]:
        metric = {"factor score": "factor_score", "MIG": "mig", "MIG-sup": "mig_sup",
                  "reconstruction error": "recon_error"}[row[0]["text"]]
        (lead, v1), (second, v2) = family_best("dsprites", metric)[:2]
        assert (row[1]["text"], row[4]["text"]) == (lead, second)
        assert float(row[7]["text"]) == pytest.approx(abs(v1 - v2), rel=1e-2)

    facts = sweep_facts(page)
    recorded = sum(len(s) for s in CELLS.values()) + 3  # two failed runs and one still running
    counts = {name: int(cell["text"]) for name, cell in facts.items() if "data-count" in cell["attrs"]}
    assert counts == {"trial runs": recorded, "finished": recorded - 3, "failed": 2, "running / killed": 1,
                      "cells": len(CELLS) + 1, "incomplete cells (1 to 2 finished seeds)": 1,
                      "cells with none finished": 1}
    assert int(facts["not started"]["text"]) == PLANNED - recorded
    assert facts["preset"]["text"] == "smoke" and facts["betas"]["text"] == "1,4"
    assert float(facts["wall time"]["attrs"]["data-seconds"]) == 600.0  # the parent run's start to end
    assert float(facts["compute (sum over trial runs)"]["attrs"]["data-seconds"]) == 20.0 * (recorded - 1)
    assert facts["hardware"]["text"] == HARDWARE
    text = path.read_text()
    assert html.escape(ERROR) in text and ERROR not in text
    assert "injected" not in {img.get("alt") for img in page.images}

    # The best run of each family by MIG-sup (never the failed or the running one, both 'perfect').
    shown = {(r["data-dataset"], r["data-family"]): r["data-run-id"] for r in page.runs}
    assert shown == {(d, f): store["ids"][(d, f, beta), seed]
                     for (d, f), (beta, seed) in store["best"].items()}
    assert not {store["running"], *store["failed"]} & {r["data-run-id"] for r in page.runs}
    links = [f"/#/experiments/{store['exp_id']}/runs/{r['data-run-id']}?workflowType=machine_learning"
             for r in page.runs]
    assert all(f'http://127.0.0.1:5000{link}"' in path.read_text() for link in links)


def test_every_image_is_inlined_and_written_beside_the_page(store, tmp_path):
    path, page = report(store, tmp_path / "out", sweep="main")
    assert page.images
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix), img.get("alt")
        data = base64.b64decode(img["src"][len(prefix):], validate=True)
        beside = path.parent / img["data-file"]
        assert beside.is_file() and beside.read_bytes() == data
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    fig = {img["data-file"] for img in page.images if img["run"] is None}
    assert fig == {f"images/fig{n}_{d}.png" for n in (2, 3) for d in ("dsprites", "shapes3d")}

    def shown(family: str) -> dict[str, bytes]:
        """artifact path -> the image bytes shown for the family's best dsprites run."""
        run_id = next(r["data-run-id"] for r in page.runs if (r["data-dataset"], r["data-family"]) ==
                      ("dsprites", family))
        return {img["data-artifact"]: base64.b64decode(img["src"].split(",", 1)[1]) for img in page.images
                if img["run"] == run_id and "data-artifact" in img}

    new = store["artifacts"]["pro_vlae"]  # the newer names win over the final-stage copies and the old ones
    wanted = [f"figures/stage{s}/information.png" for s in range(3)] + ["figures/traversal.png"]
    assert shown("pro_vlae") == {p: new[p] for p in wanted}
    old = store["artifacts"]["vlae"]
    assert shown("vlae") == old  # the old layout: information_per_stage, prior_z<l>, traversal_z<l>
    assert shown("beta_vae") == {}
    pro = next(r["data-run-id"] for r in page.runs if (r["data-dataset"], r["data-family"]) ==
               ("dsprites", "pro_vlae"))
    drawn = [img for img in page.images if img["run"] == pro and "mi_z" in img["alt"]]
    assert len(drawn) == 1  # Fig. 5 bars drawn from the run's own metric history
    assert "This run logged no figures" in path.read_text()  # beta_vae's best run


def test_without_a_sweep_every_sweep_is_pooled(store, tmp_path):
    path, page = report(store, tmp_path / "pooled")
    text = path.read_text()
    assert "Pooled: main, other." in text
    assert [c["text"] for c in page.tables["sweeps"][0][1:]] == ["main", "other"]
    pooled = {**RAW, ("dsprites", "vlae", 1.0): {**RAW[("dsprites", "vlae", 1.0)],
                                                 9: {"mig": 0.345, "mig_sup": 0.95, "factor_score": 0.5,
                                                     "recon_error": 50.0}}}
    row = next(r for r in page.tables["topk-dsprites"][1:] if (r[0]["text"], r[1]["text"]) == ("vlae", "1"))
    mig_sup = next(c for c in row if c["attrs"].get("data-metric") == "mig_sup")
    assert float(mig_sup["attrs"]["data-mean"]) == pytest.approx(top3(("dsprites", "vlae", 1.0), "mig_sup",
                                                                       pooled)[0])
    vlae = next(r["data-run-id"] for r in page.runs if (r["data-dataset"], r["data-family"]) ==
                ("dsprites", "vlae"))
    assert vlae == store["extra"]  # the other sweep's run is now vlae's best


def test_an_earlier_report_is_replaced_whole(store, tmp_path):
    out = tmp_path / "out"
    report(store, out, sweep="main")
    (out / "images" / "stale.png").write_bytes(b"x")
    report(store, out, sweep="other")
    assert not (out / "images" / "stale.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(analysis.AnalysisError, match="not a report folder"):
        report(store, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cli_writes_the_report_and_bad_input_is_one_line(store, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    result = run_command("analysis", "report", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"],
                         "--sweep", "main", "--out", str(out), capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"Report: {out / 'index.html'}"
    assert "Downloading artifacts" not in result.stderr  # no progress bar per fetched figure
    client = store["client"]
    only_failed = client.create_experiment("failed-only")
    parent = client.create_run(only_failed, tags={"provlae.role": "sweep", "sweep": "f"}).info.run_id
    trial(client, only_failed, parent, "f", ("dsprites", "vlae", 1.0), 0, {"mig": 0.1}, "FAILED")
    for args, message in [(["--experiment", "nope"], "no MLflow experiment named 'nope'"),
                          (["--experiment", EMPTY], "has no trial runs"),
                          (["--experiment", EXPERIMENT, "--sweep", "nope"], "no runs of sweep 'nope'"),
                          (["--experiment", "failed-only"], "no FINISHED trial runs (1 FAILED)"),
                          (["--experiment", EXPERIMENT, "--best-by", "nope"],
                           "unknown best-by metric 'nope'")]:
        bad = tmp_path / "bad"
        assert main(["report", *args, "--tracking-uri", store["uri"], "--out", str(bad)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.strip().count("\n") == 0 and message in err, err
        assert not bad.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cli"]


@pytest.mark.slow  # a real Chromium
def test_the_page_renders_in_a_headless_browser(store, tmp_path):
    """Chromium loads the page from disk: its tables are there, every image decodes (naturalWidth > 0).
    A copy with one image damaged shows that the check sees a broken image."""
    from browser import broken_images, headless_chromium, save_page_screenshot

    path, page = report(store, tmp_path / "out", sweep="main")
    damaged = path.with_name("damaged.html")
    text = path.read_text()
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    damaged.write_text(text[:start] + "AAAA" + text[start + 4:])
    with headless_chromium() as driver:
        driver.get(path.as_uri())
        assert driver.title == f"provlae report: {EXPERIMENT}"
        tables = driver.execute_script(
            "return Array.from(document.querySelectorAll('table')).map(t => [t.id, t.rows.length])")
        assert dict(tables) == {t: len(rows) for t, rows in page.tables.items()}
        assert {"sweeps", "topk-dsprites", "topk-shapes3d", "compare-dsprites"} <= dict(tables).keys()
        count = driver.execute_script("return document.images.length")
        assert count == len(page.images) and broken_images(driver) == []
        sizes = driver.execute_script(
            "return Array.from(document.images).map(i => i.getBoundingClientRect().width)")
        assert min(sizes) > 0  # laid out, not hidden
        folder = Path(os.environ.get("PROVLAE_SCREENSHOT_DIR", tmp_path))  # set it to keep the screenshot
        shot = save_page_screenshot(driver, folder / "report.png")
        driver.get(damaged.as_uri())
        assert len(broken_images(driver)) == 1
    with Image.open(shot) as image:
        assert image.size[1] > 2000  # the whole page, not one screen


def test_the_sweep_logs_its_report_and_says_where(store, tmp_path):
    """The end of a sweep (sweeps.launch): the report beside the Ray results and as the parent run's
    artifact, its path and the runs table's URL as the last lines; no finished run is one line, no error."""
    import argparse

    from sweeps.launch import report_lines, runs_table_line, write_sweep_report

    client = store["client"]
    args = argparse.Namespace(experiment=EXPERIMENT, storage=str(tmp_path / "ray"), name="main")
    line = write_sweep_report(args, store["uri"], store["parent"], client)
    page = tmp_path / "ray" / "main" / "report" / "index.html"
    assert line == f"Report: {page} (also the parent run's artifact report/index.html)"
    logged = Path(client.download_artifacts(store["parent"], "report/index.html", str(tmp_path)))
    assert logged.read_bytes() == page.read_bytes()  # one self-contained file: every image inlined
    images = Page(logged.read_text()).images
    assert images and all(img["src"].startswith("data:image/png;base64,") for img in images)
    url = f"http://127.0.0.1:5000/#/experiments/{store['exp_id']}/runs?workflowType=machine_learning"
    assert runs_table_line(store["uri"], store["exp_id"]) == f"Runs table: {url}"
    assert report_lines(EXPERIMENT, "main", store["uri"], str(tmp_path / "ray")) == [f"Report: {page}",
                                                                                  f"Runs table: {url}"]

    lost = client.create_experiment("all-failed")
    parent = client.create_run(lost, tags={"provlae.role": "sweep", "sweep": "lost"}).info.run_id
    trial(client, lost, parent, "lost", ("dsprites", "vlae", 1.0), 0, {"mig": 0.1}, "FAILED")
    args = argparse.Namespace(experiment="all-failed", storage=str(tmp_path / "ray"), name="lost")
    line = write_sweep_report(args, store["uri"], parent, client)
    assert line == "Report: not written (sweep 'lost' has no FINISHED trial runs (1 FAILED))"
    assert not (tmp_path / "ray" / "lost").exists()
