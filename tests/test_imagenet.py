"""ImageNet subsets and Imagenette: class selection and label order, the restricted 1000-class teacher, bad input."""
import copy
import os
import shutil

import pytest
import torch
import torchvision

from conftest import REPO, data_args, fake_pretrained_weights, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.core import classifier, restrict_classifier
from lightning_kd.data import ImageNetDataModule, ImagenetteDataModule
from lightning_kd.data.imagenet import IMAGENETTE_WNIDS, imagenet_wnids, select_wnids
from lightning_kd.methods import KD
from tiny_data import write_tiny_image_folder

# Imagenette's classes, their ImageNet-1k indices and torchvision's names for them (fast.ai's table).
IMAGENETTE = {
    "n01440764": (0, "tench"), "n02102040": (217, "English springer"), "n02979186": (482, "cassette player"),
    "n03000684": (491, "chain saw"), "n03028079": (497, "church"), "n03394916": (566, "French horn"),
    "n03417042": (569, "garbage truck"), "n03425413": (571, "gas pump"), "n03445777": (574, "golf ball"),
    "n03888257": (701, "parachute"),
}  # fmt: skip
FIRST_THREE = ["n01440764", "n01443537", "n01484850"]  # tench, goldfish, great white shark
# Six real classes, out of order: labels must follow the ImageNet-1k order whatever order they are given in.
TREE_WNIDS = ["n04589890", "n03888257", "n01484850", "n02102040", "n01443537", "n01440764"]
TREE_INDICES = {"n01440764": 0, "n01443537": 1, "n01484850": 2, "n02102040": 217, "n03888257": 701, "n04589890": 904}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """train/ and val/ folders of TREE_WNIDS with three 16x16 images each (0000.png .. 0002.png)."""
    return write_tiny_image_folder(str(tmp_path_factory.mktemp("tree")), TREE_WNIDS, per_class=3, size=16)


def small(**kwargs) -> dict:
    return {"batch_size": 4, "num_workers": 0, **kwargs}


# --------------------------------------------------------------------------- shipped lists, selection
def test_the_shipped_imagenet_list_is_torchvisions_class_order():
    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    names = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    for wnid, (index, name) in IMAGENETTE.items():
        assert wnids.index(wnid) == index and names[index] == name
    assert set(IMAGENETTE_WNIDS) == set(IMAGENETTE)


def test_subset_selection(tmp_path):
    assert select_wnids(None) == list(imagenet_wnids())
    assert select_wnids(3) == FIRST_THREE
    hundred = select_wnids("imagenet100")
    assert len(set(hundred)) == 100 and hundred == sorted(hundred) and set(hundred) <= set(imagenet_wnids())
    assert hundred[:3] == ["n01558993", "n01692333", "n01729322"]
    assert select_wnids(["n03888257", "n01440764"]) == ["n01440764", "n03888257"]
    listing = tmp_path / "classes.txt"
    listing.write_text("# my classes\nn03888257 parachute, chute\n\nn01440764\n")
    assert select_wnids(str(listing)) == ["n01440764", "n03888257"]


def test_a_seeded_random_subset_is_reproducible():
    drawn = select_wnids(10, seed=3)
    assert drawn == select_wnids(10, seed=3) == sorted(drawn)
    assert len(set(drawn)) == 10 and set(drawn) <= set(imagenet_wnids())
    assert drawn != select_wnids(10, seed=4) and drawn != select_wnids(10)


@pytest.mark.parametrize(
    ("subset", "seed", "message"),
    [
        (["n01440764", "n99999999"], None, r"not ImageNet-1k classes: n99999999"),
        (["n01440764", "tench"], None, r"not WordNet ids .*: tench"),
        (["n01440764", "n01440764", "n01443537"], None, r"more than once: n01440764"),
        (1001, None, r"number of classes must lie in \[2, 1000\], got 1001"),
        (1, None, r"number of classes must lie in \[2, 1000\], got 1"),
        ("imagenet200", None, r"'imagenet200' is neither a shipped list \(imagenet100\) nor an existing file"),
        ("imagenet100", 0, r"subset_seed draws a number of classes at random"),
    ],
)
def test_bad_subsets_are_one_clear_error(subset, seed, message):
    with pytest.raises(ValueError, match=message):
        ImageNetDataModule("anywhere", subset=subset, subset_seed=seed)


# --------------------------------------------------------------------------- the data module
def test_labels_follow_the_imagenet_order_of_the_selected_ids(tree):
    dm = ImageNetDataModule(tree, subset=TREE_WNIDS[:4], **small())
    expected = sorted(TREE_WNIDS[:4])
    assert dm.num_classes == 4 and dm.class_names == expected
    assert dm.imagenet_class_indices == [TREE_INDICES[w] for w in expected]
    dm.setup("fit")
    for split in (dm.train_dataset.dataset, dm.test_dataset.dataset):
        assert len(split) == 12  # three images of each selected class; the other folders are not read
        for path, label in split.samples:
            assert os.path.basename(os.path.dirname(path)) == expected[label]


def test_imagenet100_on_a_root_of_all_classes(tiny_imagenet):
    dm = ImageNetDataModule(tiny_imagenet, subset="imagenet100", **small())
    dm.setup("fit")
    assert dm.num_classes == 100 and len(dm.train_dataset) == len(dm.val_dataset) == 100
    indices = dm.imagenet_class_indices
    assert indices == sorted(indices) and [imagenet_wnids()[i] for i in indices] == dm.class_names


def test_images_per_class_keeps_the_first_files_of_each_class(tree):
    dm = ImageNetDataModule(tree, subset=FIRST_THREE, images_per_class=2, **small())
    dm.setup("fit")
    for split in (dm.train_dataset.dataset, dm.test_dataset.dataset):
        assert sorted(os.path.basename(p) for p, _ in split.samples) == sorted(["0000.png", "0001.png"] * 3)
        assert split.targets == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("image_size", [224, 64])
def test_image_size_sets_the_train_and_eval_resolution(tree, image_size):
    dm = ImageNetDataModule(tree, subset=FIRST_THREE, image_size=image_size, **small())
    dm.setup("fit")
    assert dm.train_dataset[0][0].shape == dm.test_dataset[0][0].shape == (3, image_size, image_size)


def test_ids_missing_from_the_root_are_listed(tree):
    dm = ImageNetDataModule(tree, subset=["n01440764", "n13133613", "n15075141"], **small())
    missing = r"2 of the 3 selected classes have no folder in .*train'?: n13133613, n15075141"
    with pytest.raises(FileNotFoundError, match=missing):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"994 of the 1000 selected classes .*: n01491361, .* \(and 974 more\)$"):
        ImageNetDataModule(tree, **small()).setup("fit")


def test_an_empty_class_folder_is_named(tmp_path):
    root = write_tiny_image_folder(str(tmp_path), FIRST_THREE, per_class=1, size=8)
    empty = os.path.join(root, "val", "n01443537")
    shutil.rmtree(empty)
    os.makedirs(empty)
    dm = ImageNetDataModule(root, subset=FIRST_THREE, **small())
    with pytest.raises(FileNotFoundError, match=f"without any image: {empty}$"):
        dm.setup("fit")


def test_a_root_without_class_folders_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no 'train/' directory in root"):
        ImageNetDataModule(str(tmp_path), subset=3, **small()).setup("fit")


def test_prepare_data_extracts_the_ilsvrc_archives_with_torchvision(tmp_path, tree, monkeypatch):
    extracted = []
    monkeypatch.setattr(torchvision.datasets, "ImageNet", lambda root, split: extracted.append((root, split)))
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").touch()
    ImageNetDataModule(str(tmp_path), subset=3).prepare_data()
    assert extracted == [(str(tmp_path), "train"), (str(tmp_path), "val")]
    ImageNetDataModule(tree, subset=3).prepare_data()  # class folders, no archives: nothing to extract
    assert len(extracted) == 2


def test_a_checkpoint_of_other_classes_is_refused(tree):
    trained = ImageNetDataModule(tree, subset=FIRST_THREE)
    ImageNetDataModule(tree, subset=FIRST_THREE).load_state_dict(trained.state_dict())
    with pytest.raises(ValueError, match=r"trained on other classes .*: n01484850, n02102040"):
        ImageNetDataModule(tree, subset=["n01440764", "n01443537", "n02102040"]).load_state_dict(trained.state_dict())


def test_imagenette_labels_and_teacher_indices(tiny_imagenette):
    dm = ImagenetteDataModule(tiny_imagenette, image_size=32, **small())
    dm.prepare_data()  # download=True, but the extracted folder is there: nothing is fetched
    dm.setup("fit")
    assert dm.class_names == sorted(IMAGENETTE) and len(dm.train_dataset) == len(dm.val_dataset) == 20
    assert dm.imagenet_class_indices == [IMAGENETTE[w][0] for w in sorted(IMAGENETTE)]
    assert dm.train_dataset[0][0].shape == (3, 32, 32)


def test_a_missing_imagenette_class_is_named(tiny_imagenette, tmp_path):
    root = shutil.copytree(tiny_imagenette, tmp_path / "copy")
    shutil.rmtree(root / "imagenette2-320" / "val" / "n03028079")
    with pytest.raises(FileNotFoundError, match=r"Imagenette classes without a val folder under .*: n03028079$"):
        ImagenetteDataModule(str(root), download=False, **small()).setup("fit")


def test_imagenette_not_downloaded_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Imagenette \(160px\) not found .* Set download=true"):
        ImagenetteDataModule(str(tmp_path), size="160px", download=False).setup("fit")


# --------------------------------------------------------------------------- the restricted teacher
def full_teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=1000).eval()


def test_the_restricted_teacher_gives_the_full_teachers_logits_at_the_subset_indices():
    teacher, x, indices = full_teacher(), torch.randn(2, 3, 32, 32), [904, 2, 701, 0]
    with torch.no_grad():
        full = teacher(x)
        restricted = restrict_classifier(copy.deepcopy(teacher), indices)(x)
    assert restricted.shape == (2, 4)
    torch.testing.assert_close(restricted, full[:, indices])


@pytest.mark.parametrize("indices", [[0, 1000], [3, 3], [-1, 2]])
def test_restricting_to_impossible_classes_is_one_clear_error(indices):
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 1000\)"):
        restrict_classifier(full_teacher(), indices)


def test_a_module_restricts_a_1000_class_checkpoint_but_loads_a_subset_one_as_it_is(tmp_path):
    teacher, x, indices = full_teacher(), torch.randn(2, 3, 32, 32), [1, 217, 701]
    torch.save(teacher.state_dict(), tmp_path / "full.pth")
    model = KD(student="resnet18", num_classes=3, teacher="resnet18", teacher_ckpt=str(tmp_path / "full.pth"),
               teacher_classes=indices)
    with torch.no_grad():
        torch.testing.assert_close(model.teacher(x), teacher(x)[:, indices])
    subset_teacher = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(subset_teacher.state_dict(), tmp_path / "subset.pth")
    model = KD(student="resnet18", num_classes=3, teacher="resnet18", teacher_ckpt=str(tmp_path / "subset.pth"),
               teacher_classes=indices)
    with torch.no_grad():
        torch.testing.assert_close(model.teacher(x), subset_teacher(x))


def test_pretrained_teacher_weights_are_restricted_to_the_data_classes(tmp_path, monkeypatch):
    teacher, x, indices = full_teacher(), torch.randn(2, 3, 32, 32), [0, 701]
    fake_pretrained_weights(monkeypatch, tmp_path, teacher, "resnet18", "IMAGENET1K_V1")
    model = KD(student="resnet18", num_classes=2, teacher="resnet18", teacher_weights="IMAGENET1K_V1",
               teacher_classes=indices)
    with torch.no_grad():
        torch.testing.assert_close(model.teacher(x), teacher(x)[:, indices])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"teacher_weights": "IMAGENET1K_V1", "teacher_ckpt": "t.pth"}, "or model.teacher_ckpt, not both"),
        ({"teacher_weights": "IMAGENET1K_V1", "teacher": torch.nn.Linear(2, 2)}, "must name a torchvision model"),
        ({"teacher_classes": [0, 1, 2]}, "names 3 teacher outputs but the data has 2 classes"),
    ],
)
def test_inconsistent_teacher_arguments_are_one_clear_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        KD(**{"student": "resnet18", "num_classes": 2, "teacher": "resnet18", **arguments})


# --------------------------------------------------------------------------- through the CLI
def test_a_subset_fit_links_the_teacher_classes_and_logs_the_mapping(tiny_imagenet, tmp_path, monkeypatch):
    full = full_teacher()
    fake_pretrained_weights(monkeypatch, tmp_path, full, "resnet18", "IMAGENET1K_V1")
    cli = cli_main(
        ["fit", f"--config={REPO}/configs/imagenet100/kd/resnet34-resnet18.yaml", "--model.init_args.teacher=resnet18",
         *data_args(tiny_imagenet, batch_size=4, download=None), "--data.image_size=32",
         *trainer_args(tmp_path, logger=True),
         "--trainer.logger=pytorch_lightning.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    )
    dm = cli.datamodule
    assert cli.model.hparams.teacher_classes == dm.imagenet_class_indices
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(cli.model.teacher(x), full(x)[:, dm.imagenet_class_indices])
    assert cli.trainer.logger.experiment.hparams["class_wnids"] == dm.class_names == select_wnids("imagenet100")
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["ImageNetDataModule"]["class_wnids"] == dm.class_names


def test_the_link_leaves_other_data_without_teacher_classes(tiny_folder, tmp_path):
    cli = cli_main(
        [f"--config={REPO}/configs/folder/kd/resnet20-resnet8.yaml", *data_args(tiny_folder, download=None),
         "--model.init_args.teacher_ckpt=null", *trainer_args(tmp_path)],
        run=False,
    )
    assert cli.model.hparams.teacher_classes is None and classifier(cli.model.teacher)[1].out_features == 4
