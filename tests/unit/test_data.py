import pytest

from tcsched.data import ImageItem, default_photos, list_images, split


def test_labels_csv_layout(imagenet_sample):
    items = list_images(imagenet_sample)
    assert len(items) == 512
    assert all(0 <= it.label < 1000 for it in items)


def test_imagefolder_and_flat_layouts(tmp_path):
    src = default_photos()[:2]
    for i, cls in enumerate(["n02", "n01"]):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        (tmp_path / "folder" / cls / src[i].path.name).write_bytes(src[i].read_bytes())
    items = list_images(tmp_path / "folder")
    assert {(it.path.parent.name, it.label) for it in items} == {("n01", 0), ("n02", 1)}
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(src[0].read_bytes())
    assert [it.label for it in list_images(tmp_path / "flat")] == [None]


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\nx.jpg,1\n")
    with pytest.raises(ValueError, match="class_index"):
        list_images(tmp_path)


def test_split_is_deterministic_and_disjoint(tmp_path):
    items = [ImageItem(tmp_path / f"{i}.jpg", i % 10) for i in range(300)]
    a = split(items, [0.25, 0.25, 0.5])
    assert a == split(items, [0.25, 0.25, 0.5])
    assert sum(map(len, a)) == 300 and all(len(p) > 40 for p in a)
    names = [{it.path.name for it in p} for p in a]
    assert not (names[0] & names[1] or names[1] & names[2] or names[0] & names[2])
    with pytest.raises(ValueError, match="sum to 1"):
        split(items, [0.5, 0.6])
