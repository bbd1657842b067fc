"""warmstart-train in-process: exit codes, files written, one-line errors, the Pushgateway push.

Each `train` run exports for real (the slowest step of the suite), so the file runs exactly
one: the module fixture's, which also pushes to a loopback gateway.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from training.cli import main
from training.ops import JOB, push_summary
from training.splits import Protocol, load_splits
from training.synthetic import generate_synthetic

TRAIN_ARGS = [
    "train",
    "--dataset", "synthetic",
    "--synthetic-users", "200",
    "--synthetic-items", "120",
    "--meta-steps", "20",
    "--eval-every", "10",
    "--factors", "8",
    "--inner-steps", "1",  # one unrolled step: the export is quicker, the CLI's plumbing the same
    "--no-progress",
]  # fmt: skip


class Gateway:
    """A loopback HTTP server that records every request, standing in for a Pushgateway."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []  # (method, path, body)
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                gateway.requests.append((self.command, self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_POST = _record

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join()


@pytest.fixture()
def gateway():
    server = Gateway()
    yield server
    server.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, int, list[tuple[str, str, str]], str]:
    """The one `train` run of this file, pushing to a loopback gateway: (repository, exit
    code, the gateway's requests). A second version's numbering is export's next_version
    (tests/training/test_export.py); exporting twice here would double the file's time.
    The fourth item is what the run printed on stdout."""
    repository = tmp_path_factory.mktemp("repository")
    server = Gateway()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main([*TRAIN_ARGS, "--repository", str(repository), "--name", "t", "--pushgateway", server.url])
    finally:
        server.close()
    return repository, code, server.requests, out.getvalue()


# --- train ------------------------------------------------------------------------------------


def test_train_writes_an_artifact(trained):
    repository, code, _, out = trained
    assert code == 0
    assert out.strip() == f"artifact: {repository / 't' / '1'}"
    artifact = repository / "t" / "1"
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["model_name"] == "t" and manifest["model_version"] == "1"
    listed = {f["path"] for f in manifest["files"]}
    assert {"training_summary.json", "training_log.jsonl", "model.onnx", "init.safetensors"} <= listed
    summary = json.loads((artifact / "training_summary.json").read_text())
    assert summary["model_name"] == "t" and summary["dataset"] == "synthetic"
    assert summary["meta_steps"] == 20
    assert summary["model"]["factors"] == 8
    assert summary["train"]["meta_steps"] == 20 and summary["train"]["eval_every"] == 10
    log = [json.loads(line) for line in (artifact / "training_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "phase" not in entry] == [0, 10, 20]  # an evaluation every 10 meta-steps
    assert [entry["step"] for entry in log if entry.get("phase") == "engagement"] == [0, 10, 20]  # then the engagement head's
    assert all(entry["valid_loss"] > 0 for entry in log if "phase" not in entry)  # query MSE
    assert all(-1.0 <= entry["valid_loss"] < 0 for entry in log if "phase" in entry)  # minus Recall@20


def test_train_pushes_its_summary_to_the_gateway(trained):
    _, code, requests, _ = trained
    assert code == 0
    ((method, path, body),) = requests
    assert method == "PUT"
    assert path == f"/metrics/job/{JOB}/model/t"
    assert "warmstart_training_meta_steps 20.0" in body
    assert 'warmstart_training_artifact_info{model="t",version="1"} 1.0' in body


# --- data errors and usage errors -------------------------------------------------------------


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_missing_dataset_directory_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-such-ml-100k"
    assert main(["splits", "--dataset", "ml-100k", "--path", str(missing), "--out", str(tmp_path / "out")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("warmstart-train splits: error: ")
    assert str(missing) in line


def test_missing_generic_file_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "nothing.csv"
    assert main(["evaluate", "--dataset", "generic", "--path", str(missing), "--out", str(tmp_path / "out")]) == 2
    (line,) = error_lines(capsys)
    assert str(missing) in line and "not found" in line


def test_malformed_generic_csv_exits_2_naming_file_and_line(tmp_path, capsys):
    data = tmp_path / "interactions.csv"
    data.write_text("user,item,label,timestamp\nu1,i1,4,100\nu1,i2,four,101\n")
    assert main(["splits", "--dataset", "generic", "--path", str(data), "--out", str(tmp_path / "out")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("warmstart-train splits: error: ")
    assert f"{data}:3" in line and "'four'" in line
    assert not (tmp_path / "out").exists()


def test_malformed_generic_directory_names_the_file(tmp_path, capsys):
    (tmp_path / "interactions.csv").write_text("user,item,label,timestamp\nu1,i1,4,100\n")
    (tmp_path / "items.csv").write_text("item,genre\ni2,drama\n")  # i1 is missing
    assert main(["splits", "--dataset", "generic", "--path", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    (line,) = error_lines(capsys)
    assert f"{tmp_path / 'interactions.csv'}:2" in line and "'i1'" in line and "items.csv" in line


@pytest.mark.parametrize("command", ["splits", "evaluate", "train", "export"])
def test_movielens_without_path_is_a_usage_error(command, tmp_path, capsys):
    extra = ["--checkpoint", str(tmp_path)] if command == "export" else []
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--dataset", "ml-100k", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--dataset ml-100k needs --path" in err and "usage:" in err


def test_synthetic_with_path_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["splits", "--dataset", "synthetic", "--path", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--path is not used with --dataset synthetic" in capsys.readouterr().err


def test_unknown_scenario_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["splits", "--synthetic-users", "40", "--scenario", "new_users,cold", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--scenario: choose from new_users, new_items, new_users_items" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["splits", "evaluate", "train", "export"])
def test_help_of_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: warmstart-train {command}")
    assert "--dataset" in out


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("splits", "evaluate", "train", "export"))


# --- splits and evaluate ----------------------------------------------------------------------


def test_splits_writes_split_files(tmp_path, capsys):
    args = ["splits", "--synthetic-users", "60", "--synthetic-items", "40", "--folds", "2", "--seed", "4"]
    args += ["--scenario", "new_users,new_items", "--query-size", "5", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    dataset = generate_synthetic(seed=0, n_users=60, n_items=40)
    for scenario in ("new_users", "new_items"):
        directory = tmp_path / f"synthetic-{scenario}-seed4"
        assert sorted(p.name for p in directory.iterdir()) == ["split-0.json", "split-1.json"]
        protocol = Protocol(scenario=scenario, query_size=5, folds=2, seed=4)  # type: ignore[arg-type]
        splits = load_splits(directory, dataset, protocol)  # same data, same protocol: accepted
        assert [s.fold for s in splits] == [0, 1]
        assert not set(splits[0].test_users) & set(splits[1].test_users)
    assert not (tmp_path / "synthetic-new_users_items-seed4").exists()
    # A second run reuses the files (and prints the same summary).
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines() == out


def test_evaluate_writes_report_summary_and_results(tmp_path, capsys):
    out_dir = tmp_path / "eval"
    args = ["evaluate", "--methods", "global_mean,item_mean,bias", "--reference", "bias", "--dataset", "synthetic"]
    args += ["--synthetic-users", "300", "--folds", "2", "--no-progress", "--out", str(out_dir)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"report: {out_dir / 'report.md'}"
    for name in ("report.md", "summary.json", "results.jsonl"):
        assert (out_dir / name).stat().st_size > 0
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"global_mean", "item_mean", "bias"}
    assert {r["support_size"] for r in rows} == {"1", "3", "5", "10", "20", "all"}
    assert {r["fold"] for r in rows} == {0, 1}
    users = {r["user"] for r in rows}
    assert len(rows) == len(users) * 3 * 6  # every test user, once per method and size
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["reference"] == "bias"
    assert {row["method"] for row in summary["rows"]} == {"global_mean", "item_mean", "bias"}
    report = (out_dir / "report.md").read_text()
    assert "global_mean" in report and "bias" in report
    assert sorted(p.name for p in (out_dir / "splits" / "synthetic-new_users-seed0").iterdir()) == [
        "split-0.json",
        "split-1.json",
    ]


def test_evaluate_reference_must_be_a_method(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--methods", "global_mean", "--synthetic-users", "60", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--reference baseline_only must be one of --methods" in capsys.readouterr().err


def test_evaluate_bad_support_sizes_exit_2(tmp_path, capsys):
    args = ["evaluate", "--methods", "bias", "--synthetic-users", "60", "--support-sizes", "1,0", "--out", str(tmp_path)]
    assert main(args) == 2
    (line,) = error_lines(capsys)
    assert "support size must be a positive integer or 'all', got '0'" in line


# --- the Pushgateway ---------------------------------------------------------------------------


def test_push_summary_sends_every_metric(gateway):
    summary = {
        "meta_steps": 120,
        "training_wall_time_s": 42.5,
        "best_validation_loss": 0.875,
        "model_version": "7",
        "validation": [
            {"metric": "rmse", "support_size": "5", "method": "model", "value": 0.93},
            {"metric": "rmse", "support_size": "5", "method": "bias", "value": 0.95},
            {"metric": "mae", "support_size": "5", "method": "model", "value": 0.7},  # not pushed
        ],
    }
    push_summary(gateway.url, "my-model", summary)
    ((method, path, body),) = gateway.requests
    assert method == "PUT"
    assert path == "/metrics/job/warmstart_training/model/my-model"
    lines = set(body.splitlines())
    assert "warmstart_training_meta_steps 120.0" in lines
    assert "warmstart_training_wall_time_seconds 42.5" in lines
    assert "warmstart_training_best_validation_loss 0.875" in lines
    assert 'warmstart_training_validation_rmse{method="model",support_size="5"} 0.93' in lines
    assert 'warmstart_training_validation_rmse{method="bias",support_size="5"} 0.95' in lines
    assert 'warmstart_training_artifact_info{model="my-model",version="7"} 1.0' in lines
    assert any(line.startswith("warmstart_training_last_success_timestamp_seconds ") for line in lines)
    assert "0.7" not in body.replace("0.875", "")  # the MAE is not a pushed metric


def test_push_summary_to_a_dead_gateway_raises(gateway):
    url = gateway.url
    gateway.close()
    with pytest.raises(OSError):
        push_summary(url, "m", {"meta_steps": 1, "training_wall_time_s": 1.0, "best_validation_loss": 1.0}, timeout_s=5)


# --- evaluate --protocol topn -----------------------------------------------------------------


def test_evaluate_topn_writes_report_summary_and_results(tmp_path, capsys):
    out_dir = tmp_path / "topn"
    args = ["evaluate", "--protocol", "topn", "--dataset", "synthetic", "--synthetic-users", "200"]
    args += ["--synthetic-items", "120", "--only-folds", "0", "--no-progress", "--out", str(out_dir)]
    args += ["--meta-steps", "20", "--eval-every", "10"]  # the served model (a default method) trains briefly
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"report: {out_dir / 'report.md'}"
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"popular", "itemknn", "ease", "ials", "warmstart"}
    assert {r["support_size"] for r in rows} == {"0", "1", "3", "5", "10", "20"}
    assert {r["relevance"] for r in rows} == {"later", "liked"}
    assert {r["fold"] for r in rows} == {0}
    for row in rows:
        assert 0.0 <= row["recall@20"] <= 1.0 and 0.0 <= row["ndcg@10"] <= 1.0 and row["n_relevant"] >= 1
    # the same users for every method at each (section, K): paired
    users = {}
    for row in rows:
        users.setdefault((row["scenario"], row["support_size"], row["method"]), set()).add(row["user"])
    for (section, k, _), group in users.items():
        assert group == users[(section, k, "ease")]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["reference"] == "ease"
    assert {c["method"] for c in summary["coverage"]} == {"popular", "itemknn", "ease", "ials", "warmstart"}
    assert all(0.0 < c["coverage@20"] <= 1.0 for c in summary["coverage"])
    assert {s["method"] for s in summary["settings"]} == {"itemknn", "ease", "ials", "warmstart"}
    metrics = set(summary["rows"][0]["metrics"])
    assert metrics == {"recall@10", "recall@20", "ndcg@10", "ndcg@20", "popularity@20"}
    report = (out_dir / "report.md").read_text()
    assert "## Scenario: new_users (liked: label >= 4)" in report and "### Recall@20" in report
    assert "Catalog coverage@20" in report and "Chosen hyper-parameters" in report
    assert (out_dir / "new_users_recall_20.png").stat().st_size > 0


def test_evaluate_topn_usage_errors(tmp_path, capsys):
    base = ["evaluate", "--synthetic-users", "60", "--out", str(tmp_path)]
    for extra, message in (
        (["--protocol", "topn", "--methods", "popular,bias"], "unknown top-N methods ['bias']"),
        (["--protocol", "topn", "--methods", "popular"], "--reference ease must be one of --methods"),
        (["--protocol", "topn", "--methods", "popular", "--reference", "popular", "--support-sizes", "1,all"], "integer >= 0"),
        (["--liked-threshold", "4"], "--liked-threshold is for --protocol topn"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_evaluate_topn_liked_threshold_outside_the_rating_range_exits_2(tmp_path, capsys):
    args = ["evaluate", "--protocol", "topn", "--methods", "popular", "--reference", "popular"]
    args += ["--synthetic-users", "60", "--liked-threshold", "9", "--out", str(tmp_path)]
    assert main(args) == 2
    (line,) = error_lines(capsys)
    assert "liked threshold 9 must lie in (1, 5]" in line


# --- evaluate --protocol onboarding ------------------------------------------------------------


def test_evaluate_onboarding_writes_report_summary_and_results(tmp_path, capsys):
    out_dir = tmp_path / "onboarding"
    args = ["evaluate", "--protocol", "onboarding", "--dataset", "synthetic", "--synthetic-users", "200"]
    args += ["--synthetic-items", "120", "--only-folds", "0", "--no-progress", "--out", str(out_dir)]
    args += ["--meta-steps", "20", "--eval-every", "10", "--support-sizes", "2,4", "--query-size", "5"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"report: {out_dir / 'report.md'}"
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    assert {r["strategy"] for r in rows} == {"random", "popular", "melu", "dopt"}
    assert {r["asked"] for r in rows} == {2, 4} and {r["protocol"] for r in rows} == {"held_out", "remaining"}
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["reference"] == "popular" and len(summary["rows"]) == 2 * 2 * 4
    report = (out_dir / "report.md").read_text()
    assert "## Protocol `held_out`" in report and "## Protocol `remaining`" in report and "ΔRecall@20 vs popular" in report


def test_evaluate_onboarding_usage_errors(tmp_path, capsys):
    base = ["evaluate", "--protocol", "onboarding", "--synthetic-users", "60", "--out", str(tmp_path)]
    for extra, message in (
        (["--methods", "dopt,ease"], "unknown onboarding strategies ['ease']"),
        (["--methods", "dopt"], "--reference popular must be one of --methods"),
        (["--support-sizes", "0,3"], "positive integer"),
        (["--scenario", "new_items"], "simulates new users"),
        (["--liked-threshold", "4"], "--liked-threshold is for --protocol topn"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_evaluate_topn_trains_the_engagement_head_with_id_dropout_on_new_items(tmp_path, capsys):
    """--engagement-id-dropout reaches the served model of a top-N evaluation, which reports
    its validation users' new-item recall (what a dropout rate is chosen on)."""
    out_dir = tmp_path / "topn"
    args = ["evaluate", "--protocol", "topn", "--dataset", "synthetic", "--synthetic-users", "200"]
    args += ["--synthetic-items", "120", "--only-folds", "0", "--no-progress", "--out", str(out_dir)]
    args += ["--meta-steps", "20", "--eval-every", "10", "--inner-steps", "1", "--scenario", "new_items"]
    args += ["--methods", "popular,warmstart", "--reference", "popular", "--support-sizes", "1,5"]
    assert main([*args, "--engagement-id-dropout", "0.5"]) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    (chosen,) = [s for s in summary["settings"] if s["method"] == "warmstart"]
    assert chosen["engagement_id_dropout"] == 0.5
    assert 0.0 <= chosen["validation_new_item_recall_at_20"] <= 1.0
    with pytest.raises(SystemExit):
        main([*args, "--engagement-id-dropout", "1.0"])
    assert "engagement_id_dropout must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--dataset", "synthetic", "--engagement-id-dropout", "0.5", "--out", str(tmp_path / "r")])
    assert "is for --protocol topn" in capsys.readouterr().err
