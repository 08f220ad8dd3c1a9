"""The command line as a user meets it: help, listing, training, errors as one line."""

import json
import subprocess
import sys

import pytest
import yaml

from vitlab.cli import main

FAST_DATA = ["--num-train", "64", "--num-val", "64"]
BASE_ANALYSES = ["--analyses", "cka,attention_distance"]


@pytest.mark.parametrize("command", ["compare", "train", "analyze", "models"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: vitlab " + command in capsys.readouterr().out


def test_models_lists_counts(cli):
    code, out, _ = cli("models", "resnet*")
    assert code == 0
    assert "resnet20_cifar" in out and "269,722" in out and "11,173,962" in out


def test_unknown_model_is_one_line_with_suggestions(tmp_path, cli):
    code, _, err = cli("train", "--model", "resnet21_cifar", "--out", str(tmp_path / "r"), *FAST_DATA)
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "unknown model 'resnet21_cifar'" in err and "resnet20_cifar" in err


def test_unknown_data_is_one_line(tmp_path, cli):
    code, _, err = cli("train", "--data", "shape", "--out", str(tmp_path / "r"))
    assert code == 2 and err.count("\n") == 1 and "did you mean shapes" in err


def test_train_then_refuse_existing_then_analyze(tmp_path, cli):
    out_dir = tmp_path / "run"
    args = ["train", "--model", "resnet20_cifar", "--epochs", "1", "--batch-size", "32", "--out", str(out_dir)]
    code, out, _ = cli(*args, *FAST_DATA)
    assert code == 0 and "val acc" in out and (out_dir / "model.safetensors").exists()

    code, _, err = cli(*args, *FAST_DATA)
    assert code == 2 and "already exists" in err and err.count("\n") == 1

    report_dir = tmp_path / "analysis"
    code, out, _ = cli("analyze", str(out_dir), "vit_nano_patch4_32", "--out", str(report_dir),
                       "--analysis-images", "64", "--analysis-batch-size", "32", *BASE_ANALYSES, *FAST_DATA)
    assert code == 0 and f"report: {report_dir / 'report.html'}" in out
    results = json.loads((report_dir / "results.json").read_text())
    assert set(results["cka"]) == {"run vs run", "run vs vit_nano_patch4_32",
                                   "vit_nano_patch4_32 vs vit_nano_patch4_32"}


def test_compare_end_to_end_small(tmp_path, cli):
    out_dir = tmp_path / "cmp"
    code, out, _ = cli("compare", "--models", "vit_nano_patch4_32,resnet20_cifar,mixer_nano_patch4_32",
                       "--epochs", "1", "--out", str(out_dir), "--analysis-images", "64",
                       "--analysis-batch-size", "32", "--featvis-steps", "2", *FAST_DATA)
    assert code == 0 and "report:" in out
    results = json.loads((out_dir / "results.json").read_text())
    assert len(results["cka"]) == 6  # 3 models with themselves + 3 pairs
    assert [m["name"] for m in results["models"]] == ["vit_nano_patch4_32", "resnet20_cifar",
                                                      "mixer_nano_patch4_32"]
    assert list(results["attention_distance"]) == ["vit_nano_patch4_32"]
    # every analysis that applies is in the report: attention ones for the ViT only, the rest for all
    assert set(results["attention_heads"]) == {"vit_nano_patch4_32"}
    for name in ("skip_connections", "probes", "robustness", "erf", "shape_bias"):
        assert len(results[name]) == 3, name
    assert set(results["feature_visualisation"]) == {"vit_nano_patch4_32", "mixer_nano_patch4_32"}
    assert len(results["feature_reuse"]) == 3  # each run against its initial weights
    assert results["shape_bias"]["resnet20_cifar"]["trained_on"] == "shapes (random textures)"
    html = (out_dir / "report.html").read_text()
    assert html.count("<figure>") == 4 + 10  # curves, CKA within, CKA across, attention distance + one per analysis


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "vitlab", "models", "no_such_model*"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("vitlab: error: no model matches 'no_such_model*'; "
                                   "run `vitlab models` to list them all")


def test_image_size_the_patch_does_not_divide(tmp_path, cli):
    code, _, err = cli("train", "--model", "vit_nano_patch8_32", "--image-size", "36", "--batch-size", "32", "--out",
                       str(tmp_path / "r"), *FAST_DATA)
    assert code == 2 and "not divisible by the patch size 8" in err and err.strip().count("\n") == 0


def test_compare_resume_keeps_finished_runs(tmp_path, cli):
    out_dir = tmp_path / "cmp"
    args = ["compare", "--models", "resnet20_cifar,vit_nano_patch8_32", "--epochs", "1", "--out", str(out_dir),
            "--analysis-images", "64", "--analysis-batch-size", "32", "--analyses", "cka"] + FAST_DATA
    assert cli(*args)[0] == 0
    weights = (out_dir / "resnet20_cifar" / "model.safetensors").read_bytes()
    code, _, err = cli(*args)
    assert code == 2 and "already exists; pass --resume" in err
    (out_dir / "report.html").unlink()
    assert cli(*args, "--resume")[0] == 0
    assert (out_dir / "report.html").exists()
    assert (out_dir / "resnet20_cifar" / "model.safetensors").read_bytes() == weights  # not retrained


def test_compare_checks_every_model_name_first(tmp_path, cli):
    code, _, err = cli("compare", "--models", "resnet20_cifar,mixer_nano_patch8_31", "--out",
                       str(tmp_path / "c"), *FAST_DATA)
    assert code == 2 and "mixer_nano_patch8_32" in err
    assert not (tmp_path / "c").exists()  # nothing was trained
    code, _, err = cli("compare", "--models", "resnet20_cifar,resnet20_cifar", "--out", str(tmp_path / "c"))
    assert code == 2 and "listed twice" in err


def test_train_from_a_recipe_file_with_command_line_overrides(tmp_path, cli):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: resnet20_cifar\nepochs: 1\nbatch_size: 16\nlr: 0.5\n"
                      "data:\n  num_train: 32\n  num_val: 16\n")
    out_dir = tmp_path / "run"
    code, _, err = cli("train", "--config", str(recipe), "--lr", "0.002", "--out", str(out_dir))
    assert code == 0, err
    saved = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert saved["model"] == "resnet20_cifar" and saved["epochs"] == 1 and saved["batch_size"] == 16
    assert saved["optim"]["lr"] == 0.002  # the command line wins over the recipe
    assert saved["data"]["num_train"] == 32


def test_report_table_shows_each_models_numbers(tmp_path, cli):
    out_dir = tmp_path / "cmp"
    code, _, _ = cli("compare", "--models", "resnet20_cifar,mixer_nano_patch4_32", "--epochs", "1",
                     "--out", str(out_dir), "--analysis-images", "32", "--analysis-batch-size", "16",
                     *BASE_ANALYSES, *FAST_DATA)
    assert code == 0
    results = json.loads((out_dir / "results.json").read_text())
    html = (out_dir / "report.html").read_text()
    table = html[html.index("<table"):html.index("</table>")]
    for row in results["models"]:
        assert row["name"] in table and f"{row['params']:,}" in table
        assert f"{100 * row['val_acc']:.1f}" in table and row["val_acc"] is not None


def test_existing_output_is_refused_then_overwritten(tmp_path, cli):
    out_dir = tmp_path / "ana"
    args = ["analyze", "resnet20_cifar", "--out", str(out_dir), "--analysis-images", "32",
            "--analysis-batch-size", "16"] + BASE_ANALYSES + FAST_DATA
    assert cli(*args)[0] == 0
    code, _, err = cli(*args)
    assert code == 2 and "already exists; pass --overwrite" in err
    (out_dir / "stale.txt").write_text("from before")
    assert cli(*args, "--overwrite")[0] == 0
    assert not (out_dir / "stale.txt").exists() and (out_dir / "report.html").exists()


def test_overwrite_never_deletes_a_run_being_analysed(tmp_path, cli):
    run_dir = tmp_path / "runs" / "r20"
    assert cli("train", "--model", "resnet20_cifar", "--epochs", "1", "--batch-size", "32", "--out",
               str(run_dir), *FAST_DATA)[0] == 0
    code, _, err = cli("analyze", str(run_dir), "--out", str(tmp_path / "runs"), "--overwrite", *FAST_DATA)
    assert code == 2 and "would delete" in err and (run_dir / "model.safetensors").exists()


def test_texture_mode_reaches_the_run_config(tmp_path, cli):
    out_dir = tmp_path / "run"
    assert cli("train", "--model", "resnet20_cifar", "--epochs", "1", "--batch-size", "32", "--texture-mode", "match",
               "--out", str(out_dir), *FAST_DATA)[0] == 0
    assert yaml.safe_load((out_dir / "config.yaml").read_text())["data"]["texture_mode"] == "match"
