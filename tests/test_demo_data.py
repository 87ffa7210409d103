"""The demo-data maker: real photographs from scikit-image, ImageNet-like JPEGs, idempotent."""
from __future__ import annotations

from PIL import Image

from fastmoco.pipelines.demo_data import COLOR_SOURCES, GRAY_SOURCES, main, make_demo_data


def test_make_demo_data_layout_sizes_and_idempotence(tmp_path):
    root = make_demo_data(tmp_path / "demo", num_images=24, seed=0)
    files = sorted(root.glob("*/*.jpg"))
    assert len(files) == 24
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(COLOR_SOURCES + GRAY_SOURCES)
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG"
            w, h = im.size
            assert 300 <= min(w, h) <= 500 and max(w, h) / min(w, h) < 1.4
            assert im.mode == ("L" if f.parent.name in GRAY_SOURCES else "RGB")
    stamps = [f.stat().st_mtime_ns for f in files]
    make_demo_data(tmp_path / "demo", num_images=24, seed=0)        # complete: nothing rewritten
    assert [f.stat().st_mtime_ns for f in files] == stamps
    again = make_demo_data(tmp_path / "other", num_images=24, seed=0)
    assert [f.read_bytes() for f in sorted(again.glob("*/*.jpg"))] == [f.read_bytes() for f in files]


def test_cli_color_only_with_a_val_split(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--num-images", "10", "--val-images", "6", "--color-only"])
    assert "10 JPEGs" in capsys.readouterr().out
    train, val = sorted((tmp_path / "cli" / "train").glob("*/*.jpg")), sorted((tmp_path / "cli" / "val").glob("*/*.jpg"))
    assert len(train) == 10 and len(val) == 6
    assert {p.parent.name for p in train + val} <= set(COLOR_SOURCES)
    assert {p.parent.name for p in val} <= {p.parent.name for p in train}   # val's classes are train's
    assert not {p.read_bytes() for p in train} & {p.read_bytes() for p in val}
