"""Stage one -> shards -> stage two, through the public library functions, with tiny models."""
import csv

from dfkd.common.models import load_model_checkpoint
from dfkd.distill.train import TrainConfig, train
from dfkd.synth.generate import GenerateConfig, generate


def test_one_set_of_shards_trains_two_students(tiny_teacher_path, tmp_path):
    shards = tmp_path / "shards"
    generate(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(shards), num_images=96,
                            shard_size=24, write_batch_size=32, progress=False, image_format="png",
                            method_options={"num_generators": "2", "steps": "4", "train_batch_size": "20",
                                            "width": "4", "latent_dim": "8"}))
    for student in ("lenet5_half", "cifar_resnet8"):
        out = tmp_path / student
        metrics = train(TrainConfig(shards=str(shards), student=student, out=str(out), epochs=2, batch_size_per_rank=16,
                                    workers=2, progress=False, mixup=1.0))
        assert metrics["epochs"] == 2 and metrics["steps"] == 2 * (96 // 16)
        rows = list(csv.DictReader(open(out / "metrics.csv")))
        assert [int(r["epoch"]) for r in rows] == [1, 2]
        saved = load_model_checkpoint(out / "student.pt")
        assert saved["arch"] == student and saved["input_spec"]["channels"] == 1
        assert saved["input_spec"]["size"] == 28 and saved["input_spec"]["num_classes"] == 10
