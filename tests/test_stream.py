"""The streaming data path (data/stream.py, data/index.py): images of any size and mode decoded as docs/data.md
says, the evaluation view as Resize + CenterCrop computes it, batches that do not depend on the workers, a resumed
epoch or the number of ranks, and through the CLI: training and evaluation on an ImageNet-layout folder,
SIGKILL + --resume bitwise, torchrun's ranks seeing each image once, and bad folders refused before anything is
written."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from processes import kill_after_two_checkpoints

from backsmooth.data import FileDataset, StreamLoader, load_dataset
from backsmooth.data.stream import RESIZED_CROP_RATIO, EncodedImages, _crop_box
from backsmooth.errors import DataError

SRC = str(Path(__file__).resolve().parents[1] / "src")
MODES = ("jpeg", "gray", "cmyk", "rgba", "palette")


def save(path: Path, pixels: np.ndarray, mode: str) -> Image.Image:
    """Write RGB `pixels` (H, W, 3) as an image of `mode`; return the image as written (before any encoding)."""
    image = Image.fromarray(pixels)
    if mode == "jpeg":
        image.save(path.with_suffix(".JPEG"), quality=95)
    elif mode == "gray":
        image = image.convert("L")
        image.save(path.with_suffix(".png"))
    elif mode == "cmyk":
        image = image.convert("CMYK")
        image.save(path.with_suffix(".jpg"), quality=95)
    elif mode == "rgba":
        image = Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 7, np.uint8)]))
        image.save(path.with_suffix(".png"))
    else:
        image = image.quantize(16)
        image.info["transparency"] = 0
        image.save(path.with_suffix(".png"), transparency=0)
    return image


def write_imagenet(root: Path, train: int = 8, val: int = 3, seed: int = 0,
                   classes: tuple[str, ...] = ("ant", "bee", "cow")) -> None:
    """The ImageNet layout with three classes of images of varied sizes, in every mode of MODES."""
    rng = np.random.default_rng(seed)
    for part, count in (("train", train), ("val", val)):
        for name in classes:
            (root / part / name).mkdir(parents=True)
            for k in range(count):
                width, height = (int(v) for v in rng.integers(20, 70, 2))
                save(root / part / name / f"{k}", rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                     MODES[k % len(MODES)])


def one_image(tmp_path: Path, pixels: np.ndarray, mode: str, size: int, crop: float = 1.0) -> FileDataset:
    save(tmp_path / "x", pixels, mode)
    file = next(tmp_path.glob("x.*"))
    return FileDataset(EncodedImages.files(tmp_path, [file.name]), torch.zeros(1, dtype=torch.int64), size, crop,
                       workers=0)


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_becomes_rgb_as_documented(tmp_path, mode):
    pixels = np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    decoded = one_image(tmp_path, pixels, mode, 12).images[0].permute(1, 2, 0).numpy()
    file = next(tmp_path.glob("x.*"))
    with Image.open(file) as image:
        if mode == "gray":  # one channel copied to three
            expected = np.repeat(np.asarray(image)[:, :, None], 3, axis=2)
        elif mode == "rgba":  # alpha dropped, colour kept exactly
            expected = pixels
        elif mode == "palette":  # the palette's colours, transparency dropped
            expected = np.asarray(image.convert("RGBA"))[:, :, :3]
        else:  # JPEG, and CMYK by Pillow's conversion
            expected = np.asarray(image.convert("RGB"))
    assert decoded.shape == (12, 12, 3) and np.array_equal(decoded, expected)


def test_evaluation_view_is_resize_of_the_shorter_side_then_the_central_crop(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    decoded = one_image(tmp_path, pixels, "rgba", 16, crop=0.875).images[0].permute(1, 2, 0).numpy()
    short = round(16 / 0.875)  # 18: the shorter side (30) goes to 18, the longer to int(50 * 18 / 30) = 30
    resized = np.asarray(Image.fromarray(pixels).resize((30, short), Image.BILINEAR))
    top, left = round((short - 16) / 2), round((30 - 16) / 2)
    assert np.array_equal(decoded, resized[top:top + 16, left:left + 16])


def test_random_resized_crops_stay_inside_and_follow_their_draws():
    rng = random.Random(0)
    for _ in range(2000):
        width, height = rng.randint(1, 400), rng.randint(1, 400)
        seed = rng.randrange(2**32)
        top, left, h, w = _crop_box(width, height, random.Random(seed))
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h >= 1 and w >= 1
        assert (top, left, h, w) == _crop_box(width, height, random.Random(seed))
        ratio = w / h
        if (h, w) != (height, width):  # not the whole image: a drawn crop, or the fallback at an allowed ratio
            assert RESIZED_CROP_RATIO[0] * 0.8 < ratio < RESIZED_CROP_RATIO[1] * 1.25 or min(h, w) <= 3


def test_a_large_jpeg_decoded_at_a_smaller_scale_gives_the_same_crop(tmp_path):
    """The draft decode (DCT scaling) of a big photograph changes the crop's pixels little: a smooth image's crop
    from the reduced decode stays within a few levels of the one from the full decode."""
    y, x = np.mgrid[0:960, 0:1280]
    pixels = np.stack([x * 255 // 1279, y * 255 // 959, (x + y) * 255 // 2238], axis=2).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "big.png")
    views = []
    for name in ("big.jpg", "big.png"):
        data = FileDataset(EncodedImages.files(tmp_path, [name]), torch.zeros(1, dtype=torch.int64), 32, workers=0)
        views.append(data.decoded(0, "resized_crop_flip", random.Random(5)).astype(int))
    assert np.abs(views[0] - views[1]).mean() < 3


@pytest.fixture
def streamed(tmp_path):
    write_imagenet(tmp_path / "data")
    return load_dataset("imagenet", tmp_path / "data", val_size=6, cache_dir=tmp_path / "cache", image_size=24,
                        workers=0)


def test_imagenet_layout_streams_with_its_splits_and_statistics(streamed):
    assert isinstance(streamed.train, FileDataset) and streamed.image_shape == (3, 24, 24)
    assert (len(streamed.train), len(streamed.val), len(streamed.test)) == (18, 6, 9)
    assert streamed.classes == ("ant", "bee", "cow") and streamed.augment == "resized_crop_flip"
    assert streamed.mean == (0.485, 0.456, 0.406)  # ImageNet's, kept inside the model
    assert streamed.val.images.shape == (6, 3, 24, 24) and streamed.val.images.dtype == torch.uint8


def batches(loader: StreamLoader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in batch) for batch in loader.indexed_epoch(epoch, start)]


def test_batches_do_not_depend_on_workers_or_on_resuming_mid_epoch(streamed):
    def loader(workers: int) -> StreamLoader:
        return StreamLoader(streamed.train, 4, augment="resized_crop_flip", seed=7, workers=workers)

    here, workers = batches(loader(0), 1), batches(loader(2), 1)
    assert len(here) == 4
    for a, b in zip(here, workers):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    resumed = batches(loader(2), 1, start=2)
    assert all(torch.equal(x, y) for a, b in zip(here[2:], resumed) for x, y in zip(a, b))
    other_epoch = batches(loader(0), 2)
    assert not torch.equal(here[0][2], other_epoch[0][2])  # a new order each epoch
    again = batches(loader(0), 1)  # and the same augmentation draws for the same epoch
    assert torch.equal(here[0][0], again[0][0])


def test_two_ranks_together_see_the_global_batches_and_each_image_once(streamed):
    single = batches(StreamLoader(streamed.train, 6, seed=3, workers=0, drop_last=False), 0)
    ranks = [batches(StreamLoader(streamed.train, 6, seed=3, workers=0, drop_last=False, rank=r, world_size=2), 0)
             for r in (0, 1)]
    for step, whole in enumerate(single):
        joined = [torch.cat([ranks[0][step][k], ranks[1][step][k]]) for k in range(3)]
        assert all(torch.equal(a, b) for a, b in zip(whole, joined))
    seen = torch.cat([batch[2] for rank in ranks for batch in rank])
    assert sorted(seen.tolist()) == list(range(len(streamed.train)))


def test_progressive_resizing_changes_the_training_size_by_epoch_only(streamed):
    loader = StreamLoader(streamed.train, 6, augment="resized_crop_flip", workers=0, resize=((1, 16), (2, 20)))
    sizes = [{tuple(x.shape[2:]) for x, _ in loader.epoch(epoch)} for epoch in range(3)]
    assert sizes == [{(24, 24)}, {(16, 16)}, {(20, 20)}]  # before the first entry: the dataset's own size
    assert streamed.val.images.shape[2:] == (24, 24)  # validation and test keep --image-size


def test_steps_per_epoch_ends_each_epoch_early_on_both_loaders(streamed):
    from backsmooth.data import ArrayDataset, DeviceLoader
    full = batches(StreamLoader(streamed.train, 4, workers=0, seed=2), 0)
    capped = StreamLoader(streamed.train, 4, workers=0, seed=2, steps=2)
    assert len(capped) == 2 and all(torch.equal(a[2], b[2]) for a, b in zip(full, batches(capped, 0)))
    memory = ArrayDataset(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
    assert len(DeviceLoader(memory, 3, steps=2)) == 2 and len(list(DeviceLoader(memory, 3, steps=2).epoch(0))) == 2
    assert len(DeviceLoader(memory, 3, steps=9)) == 3  # at most the whole epoch


def test_an_image_that_fails_in_a_worker_is_one_line_naming_it(tmp_path):
    write_imagenet(tmp_path / "data", train=2, val=1)
    bad = tmp_path / "data" / "train" / "bee" / "0.JPEG"
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])  # the header reads, the pixels do not
    data = load_dataset("imagenet", tmp_path / "data", val_size=0, cache_dir=tmp_path / "cache", image_size=16,
                        workers=0)
    loader = StreamLoader(data.train, 6, workers=2)
    with pytest.raises(DataError) as error:
        list(loader.epoch(0))
    message = str(error.value)
    assert "\n" not in message and str(bad) in message and "not a readable image" in message


# ---------------------------------------------------------------------------------------- through the CLI

def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backsmooth", *args], env=env(), capture_output=True, text=True,
                          timeout=timeout)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "imagenet", "--data-dir", str(data), "--image-size", "24", "--arch", "small_cnn",
            "--method", "backward_smoothing", "--eps", "4/255", "--epochs", "2", "--batch-size", "6", "--val-size", "6",
            "--val-pgd-steps", "2", "--final-eval-examples", "9", "--workers", "2", "--device", "cpu",
            "--cache-dir", str(data.parent / "cache"), "--out", str(out), "--no-progress", *extra]


@pytest.mark.slow
def test_train_and_evaluate_a_folder_of_mixed_images_through_the_cli(tmp_path):
    write_imagenet(tmp_path / "data")
    trained = cli(*train_args(tmp_path / "data", tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr
    config = __import__("json").loads((tmp_path / "run" / "config.json").read_text())
    assert (config["loader"], config["image_size"], config["workers"]) == ("auto", 24, 2)
    evaluated = cli("eval", str(tmp_path / "run"), "--attacks", "pgd5", "--n-examples", "9", "--no-progress")
    assert evaluated.returncode == 0, evaluated.stderr
    assert (tmp_path / "run" / "eval-run.json").exists() and "9 of 9 imagenet test examples" in evaluated.stdout
    three = cli("eval", str(tmp_path / "run"), "--attacks", "autoattack", "--name", "aa")  # AutoAttack needs 4 classes
    assert three.returncode == 2 and "autoattack needs a model of at least 4 classes" in three.stderr
    assert not (tmp_path / "run" / "eval-aa.json").exists()


@pytest.mark.slow
def test_sigkill_mid_epoch_and_resume_give_the_same_weights(tmp_path):
    write_imagenet(tmp_path / "data", train=10)
    args = ("--checkpoint-every", "2", "--log-every", "1")
    reference = cli(*train_args(tmp_path / "data", tmp_path / "reference", *args))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    kill_after_two_checkpoints([sys.executable, "-m", "backsmooth", *train_args(tmp_path / "data", out, *args)], out,
                               env())
    resumed = cli(*train_args(tmp_path / "data", out, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "reference" / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_ranks_see_each_image_once_per_epoch(tmp_path, streamed):
    worker = str(Path(__file__).with_name("stream_ranks_worker.py"))
    done = subprocess.run([shutil.which("torchrun"), "--standalone", "--nproc_per_node=2", worker,
                           str(tmp_path / "data"), str(tmp_path / "cache"), str(tmp_path / "seen")], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = [torch.load(tmp_path / "seen" / f"{rank}.pt") for rank in (0, 1)]
    for epoch in (0, 1):
        both = torch.cat([seen[0][epoch], seen[1][epoch]])
        assert sorted(both.tolist()) == list(range(len(streamed.train)))
        assert set(seen[0][epoch].tolist()).isdisjoint(seen[1][epoch].tolist())


@pytest.mark.slow
def test_the_robustbench_imagenet_protocol_evaluates_5000_images_at_224_with_standard_autoattack(tmp_path):
    write_imagenet(tmp_path / "data", train=2, val=2, classes=("ant", "bee", "cow", "doe"))
    trained = cli(*train_args(tmp_path / "data", tmp_path / "run", "--image-size", "16", "--epochs", "1",
                              "--val-size", "0", "--final-eval-examples", "0", "--method", "natural"))
    assert trained.returncode == 0, trained.stderr
    clash = cli("eval", str(tmp_path / "run"), "--protocol", "robustbench-imagenet", "--eps", "8/255")
    assert clash.returncode == 2 and "--protocol robustbench-imagenet sets --eps to 4/255" in clash.stderr
    done = cli("eval", str(tmp_path / "run"), "--protocol", "robustbench-imagenet", "--no-progress", "--name", "rb")
    assert done.returncode == 0, done.stderr
    report = __import__("json").loads((tmp_path / "run" / "eval-rb.json").read_text())
    assert (report["protocol"], report["image_size"], report["subset"]["n_examples"]) == ("robustbench-imagenet",
                                                                                         224, 8)
    assert report["eps"] == "4/255" and "autoattack" in done.stdout


def bad_run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli(*train_args(tmp_path / "data", tmp_path / "run", *extra))


@pytest.mark.parametrize("damage", ["empty class", "unreadable image", "not streamable", "device loader"])
def test_bad_folders_are_one_line_exit_2_and_nothing_written(tmp_path, damage):
    write_imagenet(tmp_path / "data", train=2, val=1)
    extra: tuple[str, ...] = ()
    if damage == "empty class":
        (tmp_path / "data" / "train" / "dog").mkdir()
        expected = f"class folder {tmp_path / 'data' / 'train' / 'dog'} holds no images"
    elif damage == "unreadable image":
        (tmp_path / "data" / "train" / "ant" / "9.jpg").write_bytes(b"not an image at all")
        expected = f"{tmp_path / 'data' / 'train' / 'ant' / '9.jpg'} is not a readable image"
    elif damage == "not streamable":
        extra = ("--dataset", "digits")
        expected = "--loader stream and --image-size apply to the datasets that stream"
    else:
        extra = ("--loader", "device", "--image-size", "0")
        expected = "--loader device needs images of one size"
    result = bad_run(tmp_path, *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_file_dataset_rejects_labels_of_the_wrong_type(tmp_path):
    with pytest.raises(DataError, match="labels must be int64"):
        FileDataset(EncodedImages.files(tmp_path, ["a.png"]), torch.zeros(1), 8)
