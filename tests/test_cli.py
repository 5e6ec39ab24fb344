"""The command line: train, predict, eval, recipes, and clean errors (exit 2, no traceback)."""

import json
import shutil

import pandas as pd
import pytest

from lorakit.cli import main
from lorakit.config import load_config
from lorakit.data import split_of
from tiny_models import NEGATIVE, POSITIVE, write_reviews_csv

TINY = [
    "pretrain.epochs=1", "pretrain.max_length=64", "data.max_train_samples=1500",
    "train.epochs=1", "compare=false", "train.checkpoint_every=20",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    args = ["train", "classic", "--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    return out


def test_predict_prints_label_and_probability(run_dir, capsys):
    text = "This was a lacklustre movie with very little going for it."
    assert main(["predict", str(run_dir), text, "A moving, funny and beautifully acted film."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    label, probability, echoed = lines[0].split("\t")
    assert label in ("negative", "positive") and 0.5 <= float(probability) <= 1.0
    assert echoed == text


def test_predict_json_from_file(run_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("great fun\n\nawful, boring and far too long\n")
    assert main(["predict", str(run_dir), "--file", str(texts), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["great fun", "awful, boring and far too long"]
    for row in rows:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["probability"] == max(row["probabilities"].values())


def test_predict_file_not_in_utf8_is_read_with_a_warning(run_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_bytes("\ufeffgreat fun\n".encode() + "caf\xe9 tr\xe8s bon\n".encode("latin-1"))
    with pytest.warns(UserWarning, match="2 invalid UTF-8 byte sequence"):
        assert main(["predict", str(run_dir), "--file", str(texts), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["great fun", "caf\ufffd tr\ufffds bon"]


def test_eval_reproduces_recorded_accuracy(run_dir, capsys):
    assert main(["eval", str(run_dir), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == result["recorded_test_accuracy"]


def test_recipes_lists_classic(capsys):
    assert main(["recipes"]) == 0
    assert any(line.startswith("classic ") for line in capsys.readouterr().out.splitlines())


def test_recipes_marks_the_default_once(capsys):
    assert main(["recipes"]) == 0
    [default] = [line for line in capsys.readouterr().out.splitlines() if "default" in line]
    assert default.startswith("sentiment (default) ") and default.count("default") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "classic", "--set", "lora.r=0"], "lora.r: must be a positive integer"),
        (["train", "clasic"], "did you mean classic"),
        # a dry run reads the data (it counts the examples), so a wrong name fails there
        (
            ["train", "classic", "--set", "data.name=no-such-data", "--dry-run"],
            "Unknown dataset 'no-such-data'",
        ),
        (["eval", "/nonexistent/run"], "not a finished run directory"),
        (["predict", "/nonexistent/run", "text"], "not a finished run directory"),
        (["eval"], "Missing argument 'run_dir'"),  # click's usage errors, as typer raises them
        (["train", "--bogus"], "No such option: --bogus"),
        (["serve", "--adapter", "nonsense"], "write NAME=DIR"),  # typer.Exit(2) in the command
        (["train", "my.csv"], "File not found: my.csv"),
    ],
)
def test_errors_are_one_clean_message(args, message, capsys):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("data.path=no-such.csv", "No such file"),
        ("lora.target_modules=nothing", "matched no"),
        ("data.max_length=256", "data.max_length: 256 is more than the 128 tokens"),
    ],
)
@pytest.mark.parametrize("existing", [False, True])
def test_train_failing_in_setup_leaves_out_free(
    tiny_bert_dir, tmp_path, setting, message, existing, capsys
):
    out = tmp_path / "run"
    if existing:
        out.mkdir()
    args = ["train", "sentiment", "--out", str(out), "--set", f"model.name={tiny_bert_dir}"]
    assert main([*args, setting]) == 2
    assert message in capsys.readouterr().err
    assert out.is_dir() == existing and not (existing and any(out.iterdir()))


def test_eval_unknown_split(run_dir, capsys):
    assert main(["eval", str(run_dir), "--split", "dev"]) == 2
    assert "split: 'dev' does not exist" in capsys.readouterr().err


def test_one_set_takes_several_key_values():
    """docs/run-directory.md's `--set a=1 b=2` form reaches the parser as repeated --set options."""
    from lorakit.cli import expand_set_options

    argv = ["train", "sentiment", "--set", "data.path=my.csv", "data.text_column=review",
            "--out", "runs/x", "--set", "train.lr=1e-3"]  # fmt: skip
    assert expand_set_options(argv) == [
        "train", "sentiment", "--set", "data.path=my.csv", "--set", "data.text_column=review",
        "--out", "runs/x", "--set", "train.lr=1e-3",
    ]  # fmt: skip


COMMANDS_ON_A_RUN = [
    ["predict", "RUN", "text"], ["eval", "RUN"], ["generate", "RUN", "The"],
    ["merge", "RUN", "OUT"], ["inspect", "RUN"], ["export", "RUN", "OUT"],
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS_ON_A_RUN)
def test_damaged_summary_is_one_clean_message(run_dir, tmp_path, command, capsys):
    damaged = tmp_path / "run"
    shutil.copytree(run_dir, damaged)
    (damaged / "summary.json").write_text('{"recipe": "classic", "test_acc')  # cut short
    args = [{"RUN": str(damaged), "OUT": str(tmp_path / "merged")}.get(a, a) for a in command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "summary.json is damaged" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_set_takes_column_names_and_paths_as_written(tiny_bert_dir, tmp_path, capsys):
    """A frame saved with its default integer column names has a header "0,1"; a path may hold
    a comma. `--set` keeps such text as text instead of refusing an int or a list."""
    path = tmp_path / "reviews, 2024.csv"
    rows = [f"review {i}: a {'fine' if i % 2 else 'poor'} film,{i % 2}" for i in range(60)]
    path.write_text("0,1\n" + "\n".join(rows) + "\n")
    args = ["train", "sentiment", "--dry-run", "--set", f"data.path={path}",
            "data.text_column=0", "data.label_column=1", f"model.name={tiny_bert_dir}"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"path = {json.dumps(str(path))}" in out
    assert 'text_column = "0"' in out and 'label_column = "1"' in out


def test_train_on_a_folder_a_live_run_holds_is_one_clean_message(tmp_path, capsys):
    """A second `train --out` or `--resume` on the folder of a running train is refused before
    it writes anything there."""
    from lorakit.config import load_config
    from lorakit.recipes import recipe_path
    from lorakit.rundir import RunDir
    from lorakit.train.checkpoint import STATE, TENSORS

    out = tmp_path / "run"
    config = load_config(recipe_path("classic"), ["train.log_to=[]"])
    with RunDir.start(out, config) as live:
        live.log("train", step=3, loss=0.5)
        checkpoint = out / "checkpoints" / "step-3"
        checkpoint.mkdir(parents=True)
        (checkpoint / STATE).write_text("{}")
        (checkpoint / TENSORS).write_bytes(b"")
        written = sorted(p.name for p in out.rglob("*"))
        for args in (["classic", "--out", str(out)], ["--resume", str(out)]):
            assert main(["train", *args]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "is in use by a running `lorakit train`" in err
            assert sorted(p.name for p in out.rglob("*")) == written


def test_commands_are_calls_of_the_python_api(monkeypatch, tmp_path, capsys):
    """sweep, inspect, merge and report go through lorakit.api, as a notebook would (serve is a
    shell of its own, lorakit.serve)."""
    from lorakit import api

    calls = []

    def fake(name, result=None):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result

        monkeypatch.setattr(api, name, call)

    fake("sweep", {"sweep_dir": "runs/sweep-x", "succeeded": 0})
    fake("inspect", "modules\n")
    fake("merge", tmp_path / "merged")
    fake("report", tmp_path / "report.html")
    sweep_args = ["sweep", "classic", "--grid", "r=1,2", "--set", "train.epochs=1", "--seeds", "3"]
    assert main(sweep_args) == 1
    assert main(["inspect", "minilm"]) == 0
    assert main(["merge", "runs/a", str(tmp_path / "merged"), "--force"]) == 0
    assert main(["report", "runs/a"]) == 0
    assert [name for name, _, _ in calls] == ["sweep", "inspect", "merge", "report"]
    assert calls[0][1] == ("classic", ["r=1,2"]) and calls[0][2]["overrides"] == ["train.epochs=1"]
    assert calls[0][2]["seeds"] == 3
    assert calls[2][2] == {"force": True}
    assert capsys.readouterr().out.splitlines() == [
        "runs/sweep-x", "modules", str(tmp_path / "merged"), str(tmp_path / "report.html"),
    ]  # fmt: skip


STARS = ["good", "bad", "so so"]


def _stars_csv(path, n: int, stars=STARS, start: int = 0):
    rows = [(f"review {i}: a {stars[i % len(stars)]} film", stars[i % len(stars)])
            for i in range(start, start + n)]  # fmt: skip
    pd.DataFrame(rows, columns=["review", "stars"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def csv_run(tiny_bert_dir, tmp_path_factory):
    """A sentiment run on the tiny BERT from a user's CSV: named columns, string labels."""
    folder = tmp_path_factory.mktemp("csv-run")
    data = _stars_csv(folder / "my.csv", 120)
    out = folder / "run"
    args = ["train", "sentiment", "--out", str(out), "--set", f"data.path={data}",
            "data.text_column=review", "data.label_column=stars",
            f"model.name={tiny_bert_dir}", "train.epochs=1"]  # fmt: skip
    assert main(args) == 0
    return out


def test_eval_on_other_data_of_one_class_or_few_rows(csv_run, tmp_path, capsys):
    """Data only evaluated on needs neither two classes nor every split: a file of "good"
    reviews, or one too small for a validation split, is evaluated on its test split."""
    one_class = _stars_csv(tmp_path / "good.csv", 60, stars=["good"], start=1000)
    assert main(["eval", str(csv_run), "--data", str(one_class)]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    texts = pd.read_csv(one_class)["review"]
    assert result["examples"] == sum(split_of(t) == "test" for t in texts) > 0
    few = tmp_path / "few.csv"
    texts = [f"review {i}: a good film" for i in range(2000, 2400)]
    picked = [t for t in texts if split_of(t) == "test"][:6]
    picked += [t for t in texts if split_of(t) == "train"][:6]
    pd.DataFrame({"review": picked, "stars": ["good", "bad"] * 6}).to_csv(few, index=False)
    assert main(["eval", str(csv_run), "--data", str(few)]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["examples"] == 6
    assert main(["eval", str(csv_run), "--data", str(few), "--split", "validation"]) == 2
    assert "validation split of" in capsys.readouterr().err


def test_eval_finds_relative_data_from_another_directory(tiny_bert_dir, tmp_path, monkeypatch):
    """A run trained on `--set data.path=my.csv` records where the file is, not how the
    working directory of the day spelled it: `lorakit eval RUN_DIR` works from anywhere."""
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    _stars_csv(tmp_path / "project" / "my.csv", 60)
    args = ["train", "sentiment", "--out", "run", "--set", "data.path=my.csv",
            "data.text_column=review", "data.label_column=stars",
            f"model.name={tiny_bert_dir}", "train.max_steps=1"]  # fmt: skip
    assert main(args) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "project/run"]) == 0


def test_eval_on_data_with_other_columns_names_a_fix_eval_takes(csv_run, tmp_path, capsys):
    """`lorakit eval` has no --set: the message asks for the run's column names."""
    other = tmp_path / "other.csv"
    pd.DataFrame(
        {"text": ["a good film", "a bad film"] * 30, "label": ["good", "bad"] * 30}
    ).to_csv(other, index=False)
    assert main(["eval", str(csv_run), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "its columns are ['text', 'label']" in err and "--set" not in err
    assert "the run reads the columns 'review' and 'stars'" in err


def test_predict_file_gives_one_prediction_per_line(csv_run, tmp_path, capsys):
    """Text may hold U+2028 or U+0085 (cp1252's ellipsis read as Latin-1); only \\n, \\r\\n
    and \\r end a line of --file."""
    texts = ["great fun\u2028really", "awful\x85 film", "a calm film\x0cindeed", "ok"]
    path = tmp_path / "texts.txt"
    path.write_bytes(f"{texts[0]}\n{texts[1]}\r\n{texts[2]}\r{texts[3]}\n".encode())
    assert main(["predict", str(csv_run), "--file", str(path), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["text"] for row in rows] == texts
    assert {row["label"] for row in rows} <= set(STARS)


def test_eval_on_data_with_unknown_labels_is_a_short_message(csv_run, tmp_path, capsys):
    """Labels the run never saw are named, a few of them: a label column of free text would
    otherwise print every row."""
    other = tmp_path / "other.csv"
    pd.DataFrame({"review": [f"text {i}" for i in range(200)],
                  "stars": [f"note {i}" for i in range(200)]}).to_csv(other, index=False)  # fmt: skip
    assert main(["eval", str(csv_run), "--data", str(other)]) == 2
    error = next(line for line in capsys.readouterr().err.splitlines() if "error:" in line)
    assert "and 195 more are not among the model's labels ['bad', 'good', 'so so']" in error
    assert len(error) < 300


def test_train_on_a_file_guesses_its_columns_and_names_the_run_after_it(
    tiny_bert_dir, tmp_path, monkeypatch, capsys
):
    """`lorakit train docs.csv`: the classify recipe on the file, its columns guessed and said;
    the run's folder, log lines, config and report title name the file, not a built-in task."""
    monkeypatch.chdir(tmp_path)
    write_reviews_csv(tmp_path / "docs.csv", {"good": POSITIVE, "bad": NEGATIVE}, rows=120,
                      columns=("body", "verdict"))  # fmt: skip
    args = ["train", "docs.csv", "--set", f"model.name={tiny_bert_dir}", "train.max_steps=2"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert (
        "docs.csv: the text column 'body' (the longest free text) and the label column "
        "'verdict' (2 values); name others with --set text_column=... label_column=..."
    ) in out
    [run] = (tmp_path / "runs").iterdir()
    assert run.name.startswith("classify-docs-")
    assert "classify-docs: test accuracy" in out
    config = load_config(run / "config.toml")
    assert config.data.name == "docs" and config.data.path == str(tmp_path / "docs.csv")
    assert (config.data.text_column, config.data.label_column) == ("body", "verdict")
    assert "docs.csv" in config.description and "rotten" not in (run / "config.toml").read_text()
    assert "<h1>classify on docs.csv</h1>" in (run / "report.html").read_text()


def test_train_on_a_file_whose_columns_are_unclear_names_them(tiny_bert_dir, tmp_path, capsys):
    rows = 60
    path = tmp_path / "reviews.csv"
    pd.DataFrame({
        "review": [f"a review of some length, number {i}" for i in range(rows)],
        "stars": ["1", "2", "3"] * (rows // 3),
        "lang": ["en", "fr"] * (rows // 2),
    }).to_csv(path, index=False)  # fmt: skip
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'stars', 'lang' could each be it" in err and "label_column=" in err
    dry = ["train", str(path), "--dry-run", "--set", "label_column=stars",
           f"model.name={tiny_bert_dir}"]  # fmt: skip
    assert main(dry) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert 'text_column = "review"' in out and 'label_column = "stars"' in out


def test_merge_help_says_what_loads_each_kind(capsys):
    assert main(["merge", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "AutoModelForSequenceClassification, or lorakit predict/eval OUT_DIR" in text
    assert "GloVe classifier (not a transformers model): lorakit predict/eval OUT_DIR" in text


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_output_is_strict_json_with_a_note_for_values_that_are_not_finite(monkeypatch, capsys):
    """`lorakit eval` printed "loss": NaN, which no JSON parser reads."""
    from lorakit import api

    monkeypatch.setattr(
        api, "evaluate", lambda *a, **k: {"accuracy": 0.5, "loss": float("nan"), "split": "test"}
    )
    nan, inf = float("nan"), float("inf")
    row = {"label": "pos", "probability": nan, "probabilities": {"neg": nan, "pos": inf}}
    monkeypatch.setattr(api, "predict", lambda run_dir, texts: [row for _ in texts])
    assert main(["eval", "runs/a"]) == 0
    captured = capsys.readouterr()
    assert strict_json(captured.out) == {"accuracy": 0.5, "loss": None, "split": "test"}
    assert "loss (nan) is not finite; printed as null" in captured.err
    assert main(["predict", "runs/a", "a film", "--json"]) == 0
    captured = capsys.readouterr()
    assert strict_json(captured.out)["probabilities"] == {"neg": None, "pos": None}
    assert "probability (nan), probabilities.neg (nan), probabilities.pos (inf)" in captured.err


def test_force_is_passed_on_and_named_where_a_folder_holds_a_run(monkeypatch, tmp_path, capsys):
    from lorakit import api

    calls = []
    monkeypatch.setattr(api, "train", lambda *a, **k: calls.append(k) or {})
    assert main(["train", "classic", "--out", str(tmp_path), "--force"]) == 0
    assert calls[0]["force"] is True and calls[0]["out"] == tmp_path
    monkeypatch.undo()
    (tmp_path / "config.toml").write_text("")
    assert main(["train", "classic", "--out", str(tmp_path), "--set", "train.log_to=[]"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "add --force to start over in it" in err


@pytest.mark.parametrize("command", [["eval", "RUN"], ["predict", "RUN", "text"]])
@pytest.mark.parametrize("checkpointed", [True, False])
def test_commands_on_a_stopped_run_say_how_to_resume_it(
    run_dir, tmp_path, command, checkpointed, capsys
):
    from lorakit.train.checkpoint import STATE, TENSORS

    stopped = tmp_path / "run"
    stopped.mkdir()
    shutil.copy(run_dir / "config.toml", stopped / "config.toml")
    if checkpointed:
        checkpoint = stopped / "checkpoints" / "step-3"
        checkpoint.mkdir(parents=True)
        (checkpoint / STATE).write_text("{}")
        (checkpoint / TENSORS).write_bytes(b"")
    assert main([str(stopped) if a == "RUN" else a for a in command]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not finish (no summary.json)" in err
    if checkpointed:
        assert f"lorakit train --resume {stopped}" in err
    else:
        assert "no checkpoint" in err and f"lorakit train {stopped / 'config.toml'}" in err


def test_a_finished_run_drops_its_checkpoints_unless_kept(run_dir, tmp_path):
    """Checkpoints serve only --resume: a finished run has none left, unless it keeps them."""
    assert (run_dir / "adapter").is_dir() and not (run_dir / "checkpoints").exists()
    kept = tmp_path / "kept"
    args = ["train", "classic", "--out", str(kept), "--set", *TINY]
    assert main([*args, "train.keep_checkpoints_after_run=true"]) == 0
    assert [p.name for p in (kept / "checkpoints").iterdir()]


def test_predictor_loads_once_and_predicts_as_often_as_asked(run_dir, monkeypatch):
    from lorakit import api

    texts = ["great fun", "awful, boring and far too long"]
    expected = api.predict(run_dir, texts)
    loads = []
    real_load = api.load_predictor
    monkeypatch.setattr(api, "load_predictor", lambda *a: loads.append(a) or real_load(*a))
    predictor = api.Predictor(run_dir)
    assert predictor.predict(texts) == expected
    assert predictor.predict(texts[:1]) == expected[:1] and predictor.predict([]) == []
    assert len(loads) == 1 and predictor.labels == list(expected[0]["probabilities"])


def test_dry_run_shows_data_sizes_and_steps(tiny_bert_dir, stars_csv, capsys):
    from lorakit.data import load_dataset

    args = ["train", "classic", "--dry-run", "--set", "data.max_train_samples=1500",
            "train.epochs=2", "train.batch_size=64"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    sizes = {name: len(split) for name, split in load_dataset("rotten-tomatoes").items()}
    assert (f"examples: train 1,500, validation {sizes['validation']:,}, test "
            f"{sizes['test']:,}") in out  # fmt: skip
    assert "steps: 24 per epoch x 2 epochs = 48 optimizer steps (batch_size 64)" in out
    assert "pretrain: examples: train " in out

    args = ["train", "sentiment", "--dry-run", "--set", f"data.path={stars_csv}",
            "text_column=review", "label_column=stars", f"model.name={tiny_bert_dir}",
            "train.batch_size=16", "train.grad_accum_steps=2", "train.max_steps=7"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    train = len(load_dataset(str(stars_csv), text_column="review", label_column="stars")["train"])
    per_epoch = -(-train // 16) // 2 + (-(-train // 16) % 2 > 0)
    assert f"examples: train {train:,}," in out
    assert (f"steps: {per_epoch} per epoch x 3 epochs = {3 * per_epoch} optimizer steps "
            "(batch_size 16, grad_accum_steps 2); train.max_steps stops at 7") in out  # fmt: skip


@pytest.mark.parametrize("command", [["eval", "RUN"], ["predict", "RUN", "a good film"]])
def test_eval_and_predict_print_no_warnings_or_bars(csv_run, command):
    """What a user did not cause (transformers' deprecations, weight-loading bars) stays off
    stderr."""
    import os
    import subprocess
    import sys

    args = [str(csv_run) if a == "RUN" else a for a in command]
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout
    assert done.stderr == ""


def test_peft_loading_raises_no_deprecation_warning_of_its_own(csv_run, tiny_bert_dir):
    import warnings

    from lorakit.models.transformer import load_sequence_classifier
    from lorakit.train import engines

    model, _, _ = load_sequence_classifier(str(tiny_bert_dir), STARS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engines.load(model, csv_run / "adapter", "peft")
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]


def test_lorakit_warnings_are_one_line_without_source(run_dir, tmp_path):
    import subprocess
    import sys

    texts = tmp_path / "texts.txt"
    texts.write_bytes("caf\xe9 tr\xe8s bon\n".encode("latin-1"))
    done = subprocess.run([sys.executable, "-m", "lorakit", "predict", str(run_dir), "--file",
                           str(texts)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout
    assert done.stderr.startswith("warning: ") and "2 invalid UTF-8 byte sequence" in done.stderr
    assert done.stderr.count("\n") == 1


def test_summaries_hold_each_class_scores(run_dir, csv_run):
    from lorakit.train.metrics import per_class_scores

    for run in (run_dir, csv_run):
        summary = json.loads((run / "summary.json").read_text())
        expected = per_class_scores(summary["confusion_matrix"], summary["labels"])
        assert summary["per_class"] == expected and len(expected) == len(summary["labels"])
