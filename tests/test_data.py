import io

import numpy as np
import pytest
import torch
from PIL import Image

from handler.labels import class_index
from handler.preprocessing import PreprocessConfig, load_model_input
from lab.data import (
    LabelledImage, LesionDataset, attach_paths, build_eval_transform, build_train_transform, class_counts, lesion_grouped_split,
    read_labelled_images, read_labels)


def test_reads_ham10000_metadata(tmp_path):
    csv = tmp_path / "meta.csv"
    csv.write_text("lesion_id,image_id,dx,dx_type\nHAM_1,ISIC_1,mel,histo\nHAM_1,ISIC_2,mel,histo\nHAM_2,ISIC_3,nv,follow_up\n")
    records = read_labels(csv)
    assert [(r.image_id, r.label, r.lesion_id) for r in records] == [
        ("ISIC_1", class_index("mel"), "HAM_1"), ("ISIC_2", class_index("mel"), "HAM_1"), ("ISIC_3", class_index("nv"), "HAM_2")]


def test_reads_isic2018_ground_truth(tmp_path):
    csv = tmp_path / "gt.csv"
    csv.write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,0.0,0.0,1.0,0.0,0.0,0.0,0.0\nISIC_2,0,0,0,0,0,0,1\n")
    assert [r.label for r in read_labels(csv)] == [class_index("bcc"), class_index("vasc")]
    csv.write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,1,0,1,0,0,0,0\n")
    with pytest.raises(ValueError, match="exactly one"):
        read_labels(csv)


def test_unknown_format_and_class_are_errors(tmp_path):
    (tmp_path / "a.csv").write_text("name,label\nx,mel\n")
    with pytest.raises(ValueError, match="unknown labels format"):
        read_labels(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("image_id,dx\nx,melanoma\n")
    with pytest.raises(KeyError):
        read_labels(tmp_path / "b.csv")


def test_missing_images_are_named_not_skipped(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ISIC_1.jpg").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("image_id,dx\nISIC_1,nv\nISIC_404,mel\n")
    with pytest.raises(FileNotFoundError, match="ISIC_404"):
        attach_paths(read_labels(tmp_path / "m.csv"), [tmp_path / "img"])


def test_real_split_is_grouped_by_lesion_and_stratified(ham224_dir):
    records = read_labels(ham224_dir / "metadata.csv")
    # Duplicate some lesions to prove the grouping holds where lesions have several images.
    records = records + [r.__class__(r.image_id + "_b", r.label, r.lesion_id) for r in records[:500]]
    train, val = lesion_grouped_split(records, 0.15, seed=42)
    assert not {r.lesion_id for r in train} & {r.lesion_id for r in val}
    assert len(train) + len(val) == len(records)
    for total, in_val in zip(class_counts(records), class_counts(val)):
        assert abs(in_val / total - 0.15) < 0.06


def test_read_labelled_images_keeps_only_the_split_and_finds_each_file(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("ISIC_1.jpg", "ISIC_2.png"):
        (tmp_path / "img" / name).write_bytes(b"x")
    (tmp_path / "m.csv").write_text("image_id,dx\nISIC_1,nv\nISIC_2,mel\nISIC_3,bcc\n")
    (tmp_path / "split.json").write_text('{"val_image_ids": ["ISIC_2", "ISIC_1"]}')
    records = read_labelled_images(tmp_path / "m.csv", [tmp_path / "img"], tmp_path / "split.json")
    assert [(r.image_id, r.label, r.path) for r in records] == [
        ("ISIC_1", class_index("nv"), str(tmp_path / "img" / "ISIC_1.jpg")),
        ("ISIC_2", class_index("mel"), str(tmp_path / "img" / "ISIC_2.png"))]


def test_train_and_eval_transforms_produce_serving_tensors(tmp_path):
    config = PreprocessConfig(image_size=64, resize_size=72, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    rows = np.linspace(0, 255, 150, dtype=np.uint8)[:, None, None]
    image = Image.fromarray(np.broadcast_to(rows, (150, 200, 3)).copy())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    (tmp_path / "ISIC_1.png").write_bytes(buffer.getvalue())
    torch.manual_seed(0)
    augmented = build_train_transform(config)(image)
    validation = build_eval_transform(config)(image)
    assert augmented.dtype == validation.dtype == torch.uint8
    assert augmented.shape == validation.shape == (3, 64, 64)
    # Validation images are exactly what the service feeds the model (a lossless file here).
    served, _ = load_model_input(buffer.getvalue(), config)
    assert torch.equal(validation, served)
    dataset = LesionDataset([LabelledImage("ISIC_1", 3, "L1", str(tmp_path / "ISIC_1.png"))], build_eval_transform(config))
    tensor, label = dataset[0]
    assert len(dataset) == 1 and label == 3 and torch.equal(tensor, served)
