"""Managing `lorakit serve`'s adapters safely: who may load and unload, where loads come from,
what the listing shows, the limits an adapter file must keep, and loads that never stall
predictions. Servers run here on 127.0.0.1 (see test_serve.py for the fixtures' adapters)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

import lorakit.lora.adapter_files as adapter_files
from lorakit.cli import main
from lorakit.lora.patterns import MATCH_SECONDS
from lorakit.serve import AdapterLimits, ServeError, create_app, serve
from test_serve import KEY, TEXTS, LoopbackServer, assert_error, make_adapter, predict
from tiny_models import save_tiny_bert

AUTH = {"X-API-Key": KEY}
UNIFORM = "is not a loadable adapter under the adapter roots"


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> dict[str, Path]:
    """An adapter root with adapters in it, and an adapter outside it."""
    top = tmp_path_factory.mktemp("admin")
    base = save_tiny_bert(top / "tiny-bert")
    root = top / "root"
    run = root / "run"  # a run directory: labels from its summary
    make_adapter(base, run / "adapter", num_labels=2, seed=1)
    (run / "summary.json").write_text(json.dumps({"labels": ["neg", "pos"]}))
    return {
        "base": base,
        "root": root,
        "run": run,
        "five": make_adapter(base, root / "five", num_labels=5, seed=2),
        "no_head": make_adapter(base, root / "no-head", num_labels=2, seed=3, head=False),
        "outside": make_adapter(base, top / "outside", num_labels=2, seed=4),
    }


def running(disk, startup=True, **options):
    options = {"api_key": KEY, "adapter_roots": [disk["root"]], **options}
    adapters = {"sentiment": disk["run"]} if startup else {}
    return LoopbackServer(create_app(str(disk["base"]), adapters, **options))


@pytest.fixture(scope="module")
def server(disk):
    with running(disk) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


def load(client, name, path, headers=AUTH, **extra):
    body = {"name": name, "path": str(path), **extra}
    return client.post("/v1/adapters", json=body, headers=headers)


def unload(client, name):
    assert client.delete(f"/v1/adapters/{name}", headers=AUTH).status_code == 200


# ---------------------------------------------------------------- who may manage adapters
def test_management_is_closed_without_a_key_unless_opened(disk):
    with running(disk, api_key=None) as live, httpx.Client(base_url=live.url) as client:
        assert_error(load(client, "five", "five", headers={}), 403, "admin_closed", "--api-key")
        assert_error(client.delete("/v1/adapters/sentiment"), 403, "admin_closed")
        assert predict(client, "sentiment", TEXTS).shape == (3, 2)  # predictions stay open
    opened = {"api_key": None, "allow_unauthenticated_admin": True}
    with running(disk, **opened) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        assert load(client, "five", "five", headers={}).status_code == 201
        assert client.delete("/v1/adapters/five").status_code == 200


def test_opening_management_without_a_key_is_warned(disk, monkeypatch, capsys):
    monkeypatch.setattr("lorakit.serve.server.uvicorn.run", lambda app, **options: None)
    serve(str(disk["base"]), {}, allow_unauthenticated_admin=True)
    assert "warning: --allow-unauthenticated-admin" in capsys.readouterr().err
    serve(str(disk["base"]), {}, api_key=KEY)
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------- where loads come from
def test_loads_come_from_under_the_adapter_roots(server, disk):
    response = load(server, "five", "five")  # relative to the root
    assert response.status_code == 201, response.text
    unload(server, "five")
    response = load(server, "five", disk["five"])  # absolute, inside the root
    assert response.status_code == 201, response.text
    unload(server, "five")
    response = load(server, "run", "run")  # a run directory: its labels come along
    assert response.json()["labels"] == ["neg", "pos"]
    unload(server, "run")


def test_any_other_path_gets_one_message_that_tells_nothing_of_the_disk(server, disk, tmp_path):
    root = disk["root"]
    (root / "empty").mkdir(exist_ok=True)
    (root / "file.txt").write_text("x")
    (root / "link-out").unlink(missing_ok=True)
    (root / "link-out").symlink_to(disk["outside"], target_is_directory=True)
    sneaky = root / "sneaky"  # a real folder whose weights file is a link out of the root
    sneaky.mkdir(exist_ok=True)
    (sneaky / "adapter_config.json").write_text((disk["five"] / "adapter_config.json").read_text())
    (sneaky / "adapter_model.safetensors").unlink(missing_ok=True)
    (sneaky / "adapter_model.safetensors").symlink_to(disk["outside"] / "adapter_model.safetensors")
    paths = [
        disk["outside"],  # a real adapter outside the roots
        "../outside",
        "link-out",  # a symlink that leads out
        "sneaky",
        "missing",
        root / "missing",
        "file.txt",  # not a folder
        "empty",  # no adapter_config.json
        "/proc/self",
        "/etc",
        "",
    ]
    for path in paths:
        body = assert_error(load(server, "x", path), 422, "not_an_adapter")
        assert body["detail"] == f"{str(path)!r} {UNIFORM}", path
    names = [a["name"] for a in server.get("/v1/adapters").json()["adapters"]]
    assert names == ["sentiment"]


def test_without_roots_nothing_loads_at_run_time(disk):
    with running(disk, adapter_roots=[]) as live, httpx.Client(base_url=live.url) as client:
        body = assert_error(load(client, "five", disk["five"]), 422, "not_an_adapter")
        assert "has none" in body["detail"]


def test_errors_and_the_listing_never_show_the_servers_paths(server, disk):
    body = assert_error(load(server, "nohead", "no-head"), 422, "adapter_does_not_fit")
    assert str(disk["root"]) not in body["detail"] and "adapter no-head has no" in body["detail"]
    assert load(server, "five", "five").status_code == 201
    listed = server.get("/v1/adapters")
    assert str(disk["root"]) not in listed.text and str(disk["base"]) not in listed.text
    body = listed.json()
    assert body["base"] == "tiny-bert"
    fields = {"name", "kind", "labels", "num_labels", "rank", "max_length", "warnings"}
    for adapter in body["adapters"]:
        assert set(adapter) == fields and adapter["kind"] == "lora"
    described = [(a["name"], a["num_labels"], a["rank"]) for a in body["adapters"]]
    assert described == [("five", 5, 4), ("sentiment", 2, 4)]
    unload(server, "five")


# ---------------------------------------------------------------- limits on adapter files
def copy_adapter(source: Path, target: Path, **config_changes) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    (target / "adapter_model.safetensors").write_bytes(
        (source / "adapter_model.safetensors").read_bytes()
    )
    return target


@pytest.mark.parametrize(
    ("limits", "config_changes", "message"),
    [
        ({"max_rank": 3}, {"r": 2}, "tensor base_model.model."),  # its tensors have rank 4
        ({}, {"r": 20000}, "rank (r) is 20,000"),  # its config asks for 20000
        ({}, {"rank_pattern": {"query": 5000}}, "rank (rank_pattern) is 5,000"),
        ({"max_bytes": 1000}, {}, "--max-adapter-bytes"),
        ({"max_labels": 4}, {}, "has 5 labels"),  # a head of 5 labels
    ],
)
def test_adapters_over_the_limits_are_refused_before_a_tensor_is_read(
    disk, monkeypatch, limits, config_changes, message
):
    copy_adapter(disk["five"], disk["root"] / "big", **config_changes)

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read")

    with running(disk, startup=False, adapter_limits=AdapterLimits(**limits)) as live:
        monkeypatch.setattr("lorakit.serve.registry.read_adapter", no_reading)
        with httpx.Client(base_url=live.url, timeout=60) as client:
            body = assert_error(load(client, "big", "big"), 422, "adapter_over_limit", message)
            assert "\n" not in body["detail"] and "lorakit serve --m" in body["detail"]


def test_labels_given_with_a_load_are_limited_too(disk):
    with running(disk, adapter_limits=AdapterLimits(max_labels=3)) as live:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            labels = ["a", "b", "c", "d"]
            response = load(client, "run", "run", labels=labels)
            assert_error(response, 422, "adapter_over_limit", "4 labels", "--max-labels")


def test_a_regex_that_backtracks_without_end_is_refused_in_bounded_time(server, disk):
    copy_adapter(disk["five"], disk["root"] / "regex", target_modules="(.|..)*y.")
    start = time.monotonic()
    body = assert_error(load(server, "regex", "regex"), 422, "adapter_does_not_fit")
    assert time.monotonic() - start < 3 * MATCH_SECONDS + 5
    assert "target_modules '(.|..)*y.' takes too long" in body["detail"]
    assert predict(server, "sentiment", TEXTS).shape == (3, 2)


# ---------------------------------------------------------------- loads off the request path
def test_a_slow_load_does_not_hold_up_predictions_for_other_adapters(server, monkeypatch):
    """The files of an adapter are read (here: slowly, as from a slow disk) outside the model's
    lock: predictions for the adapters already loaded keep their pace."""
    real_open = adapter_files.safe_open
    delay = 2.0

    def slow_open(*args, **kwargs):
        time.sleep(delay)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(adapter_files, "safe_open", slow_open)
    predict(server, "sentiment", TEXTS)  # warm
    result = {}

    def load_in_background():
        started = time.monotonic()
        result["response"] = load(server, "five", "five")
        result["seconds"] = time.monotonic() - started

    loading = threading.Thread(target=load_in_background)
    loading.start()
    slowest = 0.0
    while loading.is_alive():
        started = time.monotonic()
        predict(server, "sentiment", TEXTS)
        slowest = max(slowest, time.monotonic() - started)
    loading.join()
    assert result["response"].status_code == 201, result["response"].text
    assert result["seconds"] >= delay
    assert slowest < delay / 2, f"a prediction waited {slowest:.2f} s for the load"
    unload(server, "five")


# ---------------------------------------------------------------- the command's options
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-adapter-rank", "0"], "max_rank must be at least 1"),
        (["--max-adapter-bytes", "0"], "max_bytes must be at least 1"),
        (["--max-labels", "0"], "max_labels must be at least 1"),
    ],
)
def test_the_limits_are_options_of_the_command(options, message, capsys):
    assert main(["serve", *options]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_adapter_root_must_be_a_folder(disk):
    with pytest.raises(ServeError, match="--adapter-root .*nowhere: not a folder"):
        create_app(str(disk["base"]), adapter_roots=[disk["root"] / "nowhere"])
