"""Users' own data: every --data format, the recorded preprocessing, and each bad-data case (one line, exit 2)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from splitexport import LossSpec, MonolithicModel, OptimizerSpec, SourceSpec, load_bundle, partition, write_bundle
from splitexport._cli import main
from splitexport._trainer import fit
from splitexport.models import MLP
from splitexport.simulation.data import Dataset
from splitexport.simulation.datafiles import apply_preprocess, load_data, preprocess_for

SRC = SourceSpec(file_name="m.pt", sha256="0" * 64, kind="state_dict")


def bundle(path: Path, shape: tuple[int, ...], classes: int, *, loss: str = "cross_entropy", lr: float = 0.1,
           preprocess_from: Path | None = None, target: str | None = None) -> Path:
    torch.manual_seed(0)
    part = partition(MLP(classes, int(np.prod(shape)), 16), ["relu1", "relu2"], torch.zeros(2, *shape))
    pre = None if preprocess_from is None else (lambda m: preprocess_for(preprocess_from, m, target=target))
    write_bundle(part, path, source=SRC, loss=LossSpec(kind=loss), optimizer=OptimizerSpec(lr=lr),  # type: ignore[arg-type]
                 preprocess=pre)
    return path


def write_digit_folder(root: Path, n: int = 120, size: int = 8, *, color: bool = False) -> Path:
    """Digits as RGB PNGs, one folder per class; ``color``: R, G, B planes differ (p, p/2, 255-p)."""
    d = load_digits()
    for i in range(n):
        folder = root / f"digit{d.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        p = (d.images[i] * 15.9).astype(np.uint8)
        img = Image.fromarray(np.stack([p, p // 2, 255 - p], -1) if color else p).convert("RGB")
        img.resize((size, size), Image.Resampling.NEAREST).save(folder / f"{i}.png")
    return root


def write_csv(path: Path, rows: Sequence[Sequence[object]], header: Sequence[object]) -> Path:
    path.write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("splitexport: error: ")
    return err


@pytest.fixture(scope="module")
def img_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundle(tmp_path_factory.mktemp("b") / "img", (3, 12, 12), 10)


@pytest.fixture(scope="module")
def table_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundle(tmp_path_factory.mktemp("b") / "tab", (3,), 3)


def test_npz_with_and_without_a_test_set(tmp_path: Path, table_bundle: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 3)).astype(np.float32), np.repeat(np.arange(3), [40, 24, 16])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = Dataset.from_npz(tmp_path / "d.npz")
    assert len(data.x_train) == 60 and len(data.x_test) == 20
    # stratified: each class keeps its share in the test split; fixed seed: the same split again
    assert torch.bincount(data.y_test).tolist() == [10, 6, 4]
    again = Dataset.from_npz(tmp_path / "d.npz")
    assert torch.equal(data.x_train, again.x_train)
    # every training sample comes from x, untouched
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(r) in rows for r in data.x_train.tolist())
    np.savez(tmp_path / "e.npz", x=x[:50], y=y[:50], x_test=x[50:], y_test=y[50:])
    given = load_data(tmp_path / "e.npz", load_bundle(table_bundle).manifest)
    assert len(given.x_train) == 50 and torch.equal(given.y_test, torch.as_tensor(y[50:]))
    # an npz is used as given: no normalisation
    assert torch.equal(given.x_train, torch.as_tensor(x[:50]))


def test_npy_token_ids_stay_int64(tmp_path: Path) -> None:
    tokens = np.random.default_rng(0).integers(0, 50, size=(40, 6))
    np.save(tmp_path / "tok.npy", tokens)
    np.save(tmp_path / "tok.labels.npy", np.arange(40) % 2)
    data = Dataset.from_npz(tmp_path / "tok.npy")
    assert data.x_train.dtype == torch.int64 and data.preprocess is not None and data.preprocess.kind == "tokens"
    assert apply_preprocess(data.x_train, data.preprocess).dtype == torch.int64


def test_csv_classification_with_text_labels(tmp_path: Path, table_bundle: Path) -> None:
    rows = [[i, i * 2.0, -i, ["cat", "dog", "emu"][i % 3]] for i in range(30)]
    path = write_csv(tmp_path / "t.csv", rows, ["a", "b", "c", "animal"])
    raw = Dataset.from_csv(path, "animal")
    assert raw.preprocess is not None and raw.preprocess.label_names == ["cat", "dog", "emu"]
    assert raw.preprocess.feature_names == ["a", "b", "c"]
    data = load_data(path, load_bundle(table_bundle).manifest, target="animal")
    # standardised per feature with the training split's mean/std
    assert data.x_train.mean(0).abs().max() < 1e-5
    assert torch.allclose(data.x_train.std(0, unbiased=False), torch.ones(3), atol=1e-5)
    assert data.preprocess is not None and data.preprocess.num_classes == 3


def test_image_folder_is_resized_and_labelled_by_folder(tmp_path: Path) -> None:
    root = write_digit_folder(tmp_path / "imgs", n=40, size=8)
    data = Dataset.from_image_folder(root, size=(12, 12), channels=3)
    assert tuple(data.x_train.shape[1:]) == (3, 12, 12) and len(data.x_train) + len(data.x_test) == 40
    assert data.preprocess is not None and data.preprocess.label_names == sorted(p.name for p in root.iterdir())
    assert float(data.x_train.max()) > 200  # raw pixels 0..255 until the transform (scale 1/255)
    for png in (root / "digit0").glob("*.png"):  # JPEG files count too; 1 channel reads them as grey (L)
        Image.open(png).save(png.with_suffix(".jpg"), quality=95)
        png.unlink()
    grey = Dataset.from_image_folder(root, size=(8, 8), channels=1)
    assert tuple(grey.x_train.shape[1:]) == (1, 8, 8) and len(grey.x_train) + len(grey.x_test) == 40
    assert grey.preprocess is not None and grey.preprocess.channel_order == "L"


def test_fit_accepts_a_torch_dataset() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    ds = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    model = MonolithicModel(torch.nn.Sequential(torch.nn.Linear(4, 2)), OptimizerSpec(lr=0.5), "cross_entropy")
    before = model.module[0].weight.detach().clone()  # type: ignore[index]
    hist = fit(model, ds, name="t", epochs=5, batch_size=16, progress=False)
    assert not torch.equal(before, model.module[0].weight)  # type: ignore[index]
    assert hist.epochs[-1].test_accuracy > 0.8


def test_partition_records_the_preprocessing_and_simulate_applies_it(tmp_path: Path, capsys) -> None:
    root = write_digit_folder(tmp_path / "imgs", n=150)
    b = bundle(tmp_path / "b", (3, 12, 12), 10, preprocess_from=root)
    saved = json.loads((b / "manifest.json").read_text())["preprocess"]
    assert saved["kind"] == "image" and saved["image_size"] == [12, 12] and saved["channel_order"] == "RGB"
    assert saved["num_classes"] == 10 and len(saved["mean"]) == 3 and abs(saved["scale"] - 1 / 255) < 1e-12
    # mean/std are those of the scaled training split
    raw = Dataset.from_image_folder(root, size=(12, 12), channels=3)
    assert np.allclose(saved["mean"], (raw.x_train.double() / 255).mean(dim=(0, 2, 3)).numpy())
    # other data is transformed with the recorded numbers, not refitted
    other = write_digit_folder(tmp_path / "other", n=60)
    data = load_data(other, load_bundle(b).manifest)
    raw_other = Dataset.from_image_folder(other, size=(12, 12), channels=3)
    mean = torch.tensor(saved["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(saved["std"]).view(1, 3, 1, 1)
    assert torch.allclose(data.x_train, (raw_other.x_train / 255 - mean) / std, atol=1e-5)
    assert main(["simulate", str(b), "--data", str(root), "--epochs", "4", "--no-progress", "--out",
                 str(tmp_path / "r")]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["max_weight_difference"] == 0.0
    assert metrics["runs"][0]["epochs"][-1]["test_accuracy"] > 0.5


def test_multi_client_simulate_on_a_csv_with_client_data(tmp_path: Path, table_bundle: Path) -> None:
    rng = np.random.default_rng(1)
    rows = [[*(rng.normal(size=3) + k).round(4), k] for k in range(3) for _ in range(40)]
    path = write_csv(tmp_path / "t.csv", rows, ["a", "b", "c", "y"])
    for flag in ("--client-data", "--partition"):  # --partition: the deprecated alias still works
        out = tmp_path / flag.strip("-")
        assert main(["simulate", str(table_bundle), "--data", str(path), "--target", "y", "--clients", "3", flag,
                     "noniid", "--rounds", "3", "--no-progress", "--out", str(out)]) == 0
        assert json.loads((out / "metrics.json").read_text())["runs"][0]["partition"] == "noniid"


def test_multi_client_simulate_refuses_a_regression_bundle(tmp_path: Path, capsys) -> None:
    b = bundle(tmp_path / "b", (3,), 1, loss="mse")
    rows: list[list[object]] = [[i, i + 1, i * 2, i * 0.5] for i in range(20)]
    path = write_csv(tmp_path / "t.csv", rows, ["a", "b", "c", "y"])
    err = one_line_error(capsys, ["simulate", str(b), "--data", str(path), "--target", "y", "--clients", "2",
                                  "--no-progress", "--out", str(tmp_path / "r")])
    assert "needs a classifier bundle" in err and "mse" in err


def test_bad_data_is_one_line_exit_2(tmp_path: Path, img_bundle: Path, table_bundle: Path, capsys) -> None:
    run = ["--epochs", "1", "--no-progress", "--out", str(tmp_path / "r")]
    # shape that does not fit the bundle's input, naming the expected shape
    np.savez(tmp_path / "wide.npz", x=np.zeros((20, 5), np.float32), y=np.arange(20) % 3)
    err = one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(tmp_path / "wide.npz"), *run])
    assert "(5,)" in err and "(3,)" in err
    # token ids for a float input
    np.savez(tmp_path / "tok.npz", x=np.zeros((20, 3), np.int64), y=np.arange(20) % 3)
    assert "int64" in one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(tmp_path / "tok.npz"), *run])
    # labels out of range for the classifier
    np.savez(tmp_path / "lab.npz", x=np.zeros((20, 3), np.float32), y=np.arange(20) % 4)  # label 3 of 3 classes
    err = one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(tmp_path / "lab.npz"), *run])
    assert "label 3" in err and "3 classes" in err
    np.savez(tmp_path / "neg.npz", x=np.zeros((20, 3), np.float32), y=np.arange(20) % 3 - 1)
    assert "label -1" in one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(tmp_path / "neg.npz"), *run])
    # NaN / Inf in features
    x = np.zeros((20, 3), np.float32)
    x[7, 1] = np.inf
    np.savez(tmp_path / "inf.npz", x=x, y=np.arange(20) % 3)
    assert "NaN or Inf" in one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(tmp_path / "inf.npz"), *run])
    rows: list[list[object]] = [[1, "", 2, 0], [1, 2, 3, 1], [4, 5, 6, 2], [1, 1, 1, 0]]
    nan_csv = write_csv(tmp_path / "nan.csv", rows, ["a", "b", "c", "y"])
    assert "NaN or Inf" in one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(nan_csv), "--target", "y", *run])
    # an empty class folder
    root = write_digit_folder(tmp_path / "imgs", n=30)
    (root / "zz-empty").mkdir()
    assert "'zz-empty'" in one_line_error(capsys, ["simulate", str(img_bundle), "--data", str(root), *run])
    # non-numeric CSV columns, named
    cat_rows: list[list[object]] = [[1, "red", "s", 0], [2, "blue", "m", 1], [3, "red", "l", 2], [4, "blue", "s", 0]]
    cat = write_csv(tmp_path / "cat.csv", cat_rows, ["a", "color", "size", "y"])
    err = one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(cat), "--target", "y", *run])
    assert "'color', 'size'" in err and "not numeric" in err
    # a missing target: none given, or not a column
    assert "--target COLUMN" in one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(cat), *run])
    err = one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(cat), "--target", "price", *run])
    assert "'price' is not a column" in err and "a, color, size, y" in err
    # a fractional target for a classifier; an image folder for a bundle whose input is not C x H x W
    frac = write_csv(tmp_path / "frac.csv", [[1, 2, 3, 0.5], [2, 3, 4, 1.5]], ["a", "b", "c", "y"])
    assert "non-integer" in one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(frac), "--target", "y", *run])
    assert "C x H x W" in one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(root), *run])
    # --target without --data; an unknown format; a path that is not there
    assert "--target needs --data" in one_line_error(capsys, ["simulate", str(table_bundle), "--target", "y", *run])
    (tmp_path / "x.txt").write_text("1")
    assert "unknown format" in one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(tmp_path / "x.txt"), *run])
    assert "no such file" in one_line_error(capsys, ["simulate", str(table_bundle), "--data", str(tmp_path / "no"), *run])


def test_partition_with_bad_data_writes_nothing(tmp_path: Path, capsys) -> None:
    model = tmp_path / "m.pt"
    torch.save(MLP().state_dict(), model)
    rows = [[1, "red", 0], [2, "blue", 1]]
    cat = write_csv(tmp_path / "cat.csv", rows, ["a", "color", "y"])
    err = one_line_error(capsys, ["partition", str(model), "--arch", "splitexport.models:MLP", "--input-shape", "1,64",
                                  "--cut", "relu1", "-o", str(tmp_path / "b"), "--data", str(cat), "--target", "y"])
    assert "'color'" in err
    assert not (tmp_path / "b").exists()


def test_device_runtime_bad_data_is_one_line(tmp_path: Path, table_bundle: Path, capsys) -> None:
    """The device reads its data before any server call: bad data is one line, exit 2, nothing sent."""
    from device_runtime._train import main as device_main

    rows: list[list[object]] = [[1, "red", 3, 0], [2, "blue", 4, 1]]
    cat = write_csv(tmp_path / "cat.csv", rows, ["a", "color", "c", "y"])
    base = ["train", "--server", "http://127.0.0.1:9", "--bundle", str(table_bundle), "--runtime", "torch",
            "--out", str(tmp_path / "o")]
    for extra, message in ((["--data", str(cat), "--target", "y"], "'color'"),
                           (["--data", str(cat)], "--target COLUMN"),
                           (["--target", "y"], "--target needs --data")):
        assert device_main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("device_runtime: error: ") and "\n" not in err and message in err, err


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("m") / "mlp.pt"
    torch.manual_seed(0)
    torch.save(MLP().state_dict(), path)  # 10 classes from 64 inputs (1x8x8 or 64 features)
    return path


def partition_argv(model: Path, out: Path, shape: str = "1,1,8,8") -> list[str]:
    return ["partition", str(model), "--arch", "splitexport.models:MLP", "--input-shape", shape, "--cut", "relu1",
            "-o", str(out)]


def test_partition_records_hand_given_preprocessing(tmp_path: Path, mlp_file: Path, capsys) -> None:
    """``--preprocess KEY=VALUE ...`` is recorded like the --data path's; --data then uses those numbers and
    the recorded class names (a folder holding only some classes keeps the bundle's class numbers)."""
    names = [f"digit{i}" for i in range(10)]
    b = tmp_path / "b"
    assert main([*partition_argv(mlp_file, b), "--preprocess", "scale=1/255", "mean=0.25", "std=0.5",
                 f"label_names={','.join(names)}"]) == 0
    saved = json.loads((b / "manifest.json").read_text())["preprocess"]
    assert saved == {"kind": "image", "scale": 1 / 255, "mean": [0.25], "std": [0.5], "image_size": [8, 8],
                     "channel_order": "L", "feature_names": [], "label_names": names, "num_classes": 10}
    root = tmp_path / "imgs"
    write_digit_folder(root, n=120)
    for keep in ("digit3", "digit7"):  # this device holds two of the ten classes
        (tmp_path / "two" / keep).parent.mkdir(exist_ok=True)
        (root / keep).rename(tmp_path / "two" / keep)
    data = load_data(tmp_path / "two", load_bundle(b).manifest)
    raw = Dataset.from_image_folder(tmp_path / "two", size=(8, 8), channels=1)
    assert torch.equal(data.x_train, ((raw.x_train.double() / 255 - 0.25) / 0.5).float())
    assert sorted(set(data.y_train.tolist()) | set(data.y_test.tolist())) == [3, 7]
    assert torch.equal(data.y_train, torch.tensor([3, 7])[raw.y_train])
    # a class the bundle does not know: one line, exit 2
    (tmp_path / "two" / "cat").mkdir()
    min((tmp_path / "two" / "digit3").iterdir()).rename(tmp_path / "two" / "cat" / "0.png")
    err = one_line_error(capsys, ["simulate", str(b), "--data", str(tmp_path / "two"), "--epochs", "1",
                                  "--no-progress", "--out", str(tmp_path / "r")])
    assert "'cat'" in err and "digit0" in err


def test_preprocess_overrides_what_data_fits(tmp_path: Path, mlp_file: Path) -> None:
    rows = [[*(np.arange(64) * (k + 1) + i).tolist(), ["lo", "mid", "hi"][k]] for k in range(3) for i in range(8)]
    csv = write_csv(tmp_path / "t.csv", rows, [*(f"f{j}" for j in range(64)), "y"])
    b = tmp_path / "b"
    assert main([*partition_argv(mlp_file, b, "1,64"), "--data", str(csv), "--target", "y",
                 "--preprocess", "scale=0.5"]) == 0
    saved = json.loads((b / "manifest.json").read_text())["preprocess"]
    fitted = preprocess_for(csv, load_bundle(b).manifest, target="y")
    assert saved["scale"] == 0.5 and saved["kind"] == "table" and saved["label_names"] == ["hi", "lo", "mid"]
    assert saved["mean"] == fitted.mean and saved["num_classes"] == 3  # the fitted values not given are kept


@pytest.mark.parametrize(("given", "message"), [
    (["scale=1/0"], "--preprocess scale: expected a number or a fraction like 1/255, got '1/0'"),
    (["scale=0"], "scale must be a finite non-zero number"),
    (["mean=x"], "--preprocess mean: expected comma-separated numbers, got 'x'"),
    (["mean=1,2", "std=1,2"], "mean/std have 2 values, but the bundle's input (1, 8, 8) has 1 channels"),
    (["mean=0.5"], "mean and std need one value per channel each, got 1 and 0"),
    (["mean=0.5", "std=0"], "std finite and positive"),
    (["image_size=16,16"], "image_size [16, 16] is not the bundle's input size [8, 8]"),
    (["image_size=8"], "image_size is [H, W]"),
    (["channel_order=RGB"], "channel_order RGB does not fit the bundle's 1-channel input"),
    (["channel_order=BGR"], "channel_order: Input should be 'L' or 'RGB'"),
    (["kind=tokens"], "kind 'tokens' does not fit the bundle's float32 input"),
    (["kind=table", "feature_names=a,b"], "feature_names (2) are the columns of a table input"),
    (["num_classes=11"], "num_classes 11 does not fit the bundle's classifier of 10 outputs"),
    (["label_names=a,b", "num_classes=3"], "2 label_names for num_classes 3"),
    (["num_classes=two"], "--preprocess num_classes: expected a whole number"),
    (["colour=RGB"], "KEY one of kind, scale, mean"),
    (["scale"], "--preprocess takes KEY=VALUE"),
    (["scale=2", "scale=3"], "--preprocess gives scale twice"),
])
def test_bad_preprocess_values_are_one_line(tmp_path: Path, mlp_file: Path, capsys, given: list[str],
                                            message: str) -> None:
    err = one_line_error(capsys, [*partition_argv(mlp_file, tmp_path / "b"), "--preprocess", *given])
    assert message in err, err
    assert not (tmp_path / "b").exists()


def test_preprocess_for_a_regression_bundle_has_no_classes(tmp_path: Path, mlp_file: Path, capsys) -> None:
    argv = [*partition_argv(mlp_file, tmp_path / "b", "1,64"), "--loss", "mse"]
    err = one_line_error(capsys, [*argv, "--preprocess", "label_names=a,b", "num_classes=2"])
    assert "label_names and num_classes are for classifiers" in err
    assert main([*argv, "--preprocess", "mean=1", "std=2"]) == 0
    saved = json.loads((tmp_path / "b" / "manifest.json").read_text())["preprocess"]
    assert saved["kind"] == "table" and saved["num_classes"] == 0 and saved["mean"] == [1.0]
