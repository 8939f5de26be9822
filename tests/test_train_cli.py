"""The `equiopt` command line: help, errors, and end-to-end train / compare / sweep on tiny runs."""

import csv
import json
import random
import subprocess
import sys

import pytest

from equiopt import cli

MODEL = "hidden_size=32,intermediate_size=48,num_layers=2,num_heads=2,num_kv_heads=1,head_dim=16"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    for name in ("a", "b"):
        (root / f"{name}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(9)) for _ in range(1500)))
    return root


@pytest.fixture
def common(text_dir, tmp_path):
    return [
        "--data",
        str(text_dir),
        "--vocab-size",
        "320",
        "--cache",
        str(tmp_path / "cache"),
        "--model",
        MODEL,
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--eval-tokens",
        "128",
        "--no-progress",
    ]


def test_help_everywhere(capsys):
    for argv in (["--help"], ["train", "--help"], ["compare", "--help"], ["sweep", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "compare" in out and "--lr-from" in out and "--aux-loss" in out and "--role-grid" in out


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "equiopt", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "sweep" in r.stdout


def test_commands_registry_is_extensible():
    calls = []
    cli.COMMANDS["hello"] = (lambda p: p.add_argument("--name"), lambda a: calls.append(a.name) or 0)
    try:
        assert cli.main(["hello", "--name", "x"]) == 0 and calls == ["x"]
    finally:
        del cli.COMMANDS["hello"]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--arch", "llama"], "invalid choice: 'llama'"),
        (["train", "--steps", "0"], "expected an integer >= 1"),
        (["train", "--role-lr", "embedding"], "ROLE=NUMBER"),
        (["train", "--role-lr", "head=2"], "unknown role 'head'"),
        (["train", "--arch", "olmoe", "--model", "top_k=9"], "top_k"),
        (["train", "--arch", "qwen3", "--model", "num_experts=4"], "dense"),
        (["train", "--warmup", "500", "--steps", "10"], "warmup"),
        (["compare", "--optimizers", "adamw,sgd"], "unknown optimizer 'sgd'"),
        (["compare", "--archs", "qwen3,qwen3"], "must not repeat"),
        (["sweep", "--lr-scales", "1,-2"], "positive"),
        (["sweep", "--role-grid", "vectors=2"], "unknown role 'vectors'"),
        (["train", "--data", "/nonexistent/corpus"], "neither an embedded corpus"),
        (["compare", "--lr-from", "/nonexistent/best.json"], "run `equiopt sweep` first"),
    ],
)
def test_bad_options_are_errors_with_a_message(argv, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_train_command(common, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--arch",
                "gptoss",
                "--optimizer",
                "muon",
                "--steps",
                "3",
                "--eval-every",
                "3",
                "--aux-loss",
                "--out",
                str(out),
                *common,
            ]
        )
        == 0
    )
    assert "final val loss" in capsys.readouterr().out
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["aux_loss"] is not None and rec["routing"]["load_cv"] >= 0
    with pytest.raises(SystemExit) as e:  # the run exists: refuse unless --resume / --overwrite
        cli.main(["train", "--arch", "gptoss", "--optimizer", "muon", "--steps", "3", "--out", str(out), *common])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_every_family_then_sweep_then_compare_with_chosen_lrs(common, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--archs",
        "qwen3,gemma3,olmoe,gptoss",
        "--optimizers",
        "adamw,paper",
        "--seeds",
        "2",
        "--steps",
        "2",
        "--eval-every",
        "1",
        "--out",
        str(out),
        "--jobs",
        "1",
        *common,
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "### gptoss" in printed and "Ordering by mean final validation loss" in printed
    for f in ("summary.md", "summary.csv", "summary.json", "val_loss.png", "routing.png", "max_logit.png"):
        assert (out / f).stat().st_size > 0, f
    s = json.loads((out / "summary.json").read_text())["summary"]
    assert set(s) == {"qwen3", "gemma3", "olmoe", "gptoss"}
    for arch, cells in s.items():
        assert set(cells) == {"adamw", "paper"}
        assert cells["paper"]["val_loss"]["n"] == 2 and cells["paper"]["val_loss"]["p_vs_paper"] is None
        assert 0 <= cells["adamw"]["val_loss"]["p_vs_paper"] <= 1
        assert ("router_load_cv" in cells["paper"]) == (arch in ("olmoe", "gptoss"))
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert any(r["metric"] == "router_z_loss" and r["arch"] == "olmoe" for r in rows)
    # `report` rebuilds the same summary from the run directories alone
    assert cli.main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["summary"] == s
    # a second invocation reuses the finished runs
    mtime = (out / "runs" / "qwen3" / "adamw" / "seed0" / "final.json").stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert (out / "runs" / "qwen3" / "adamw" / "seed0" / "final.json").stat().st_mtime_ns == mtime
    capsys.readouterr()

    sw = tmp_path / "sweep"
    assert (
        cli.main(
            [
                "sweep",
                "--archs",
                "olmoe",
                "--optimizers",
                "muon,paper",
                "--lr-scales",
                "0.5,2",
                "--role-grid",
                "router=0.5",
                "--steps",
                "2",
                "--eval-every",
                "2",
                "--out",
                str(sw),
                "--jobs",
                "1",
                "--extend-edges",
                "0",
                *common,
            ]
        )
        == 0
    )
    best = json.loads((sw / "best.json").read_text())
    points = json.loads((sw / "sweep.json").read_text())
    assert len(points) == 2 * 3
    for opt in ("muon", "paper"):
        b = best["olmoe"][opt]
        mine = [p for p in points if p["optimizer"] == opt]
        assert b["val_loss"] == min(p["val_loss"] for p in mine)
        assert b["lr_scale"] in (0.5, 2.0)
    capsys.readouterr()

    out2 = tmp_path / "cmp2"
    assert (
        cli.main(
            [
                "compare",
                "--archs",
                "olmoe",
                "--optimizers",
                "paper",
                "--seeds",
                "1",
                "--steps",
                "2",
                "--eval-every",
                "2",
                "--lr-from",
                str(sw / "best.json"),
                "--out",
                str(out2),
                "--jobs",
                "1",
                *common,
            ]
        )
        == 0
    )
    cfg = json.loads((out2 / "runs" / "olmoe" / "paper" / "seed0" / "config.json").read_text())
    assert cfg["lr_scale"] == best["olmoe"]["paper"]["lr_scale"]
    assert cfg["role_lr_scale"] == best["olmoe"]["paper"]["role_lr_scale"]
    with pytest.raises(SystemExit) as e:  # qwen3 was not swept
        cli.main(
            ["compare", "--archs", "qwen3", "--lr-from", str(sw / "best.json"), "--out", str(tmp_path / "x"), *common]
        )
    assert e.value.code == 2 and "no learning rate for arch 'qwen3'" in capsys.readouterr().err


@pytest.mark.slow
def test_parallel_jobs_give_the_same_results(common, tmp_path):
    """--jobs 2 (spawned workers, one thread each) reproduces --jobs 1 exactly."""
    res = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"j{jobs}"
        assert (
            cli.main(
                [
                    "compare",
                    "--archs",
                    "gptoss",
                    "--optimizers",
                    "paper",
                    "--seeds",
                    "2",
                    "--steps",
                    "3",
                    "--eval-every",
                    "3",
                    "--threads",
                    "1",
                    "--jobs",
                    jobs,
                    "--out",
                    str(out),
                    *common,
                ]
            )
            == 0
        )
        res[jobs] = [
            json.loads((out / "runs" / "gptoss" / "paper" / f"seed{s}" / "metrics.jsonl").read_text().splitlines()[-1])
            for s in (0, 1)
        ]
    for a, b in zip(res["1"], res["2"]):
        assert a["val_loss"] == b["val_loss"] and a["routing"] == b["routing"] and a["logits"] == b["logits"]
    with pytest.raises(SystemExit):
        cli.main(["compare", "--jobs", "2", "--threads", "4", "--out", str(tmp_path / "x"), *common])


def test_sweep_extends_a_winning_edge_and_descends_roles(tmp_path, monkeypatch):
    """Synthetic losses (no training): minimum at lr_scale 4, router multiplier 0.5 helps."""
    import math

    from equiopt.train import experiments as E
    from equiopt.train.loop import TrainConfig

    def fake_run_many(cfgs, **kw):
        return [
            {
                "status": "done",
                "val_loss": (math.log(c.lr_scale) - math.log(4)) ** 2
                - 0.1 * (c.role_lr_scale.get("router") == 0.5)
                + 0.2 * (c.role_lr_scale.get("router") == 2),
            }
            for c in cfgs
        ]

    monkeypatch.setattr(E, "run_many", fake_run_many)
    monkeypatch.setattr(E.D, "prepare", lambda *a, **k: None)
    res = E.sweep(
        TrainConfig(arch="olmoe"),
        ["olmoe"],
        ["paper"],
        [0.5, 1.0, 2.0],
        {"router": [0.5, 2.0]},
        tmp_path,
        log=lambda m: None,
        progress=False,
    )
    b = res["best"]["olmoe"]["paper"]
    assert b == {**b, "lr_scale": 4.0, "role_lr_scale": {"router": 0.5}, "at_grid_edge": False}
    assert sorted(p["lr_scale"] for p in res["points"] if not p["role_lr_scale"]) == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert json.loads((tmp_path / "best.json").read_text())["olmoe"]["paper"]["lr_scale"] == 4.0
