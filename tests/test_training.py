"""The training pieces of lab.training on tiny synthetic networks and data (the real run is in test_scripts.py)."""

import json

import pytest
import torch
from torch import nn

from handler.preprocessing import PreprocessConfig
from lab.training import (
    FocalLoss, Progress, Recipe, Trainer, class_weights, make_criterion, make_ema, make_optimizer, resume, run_epochs,
    save_state, seed_everything, warmup_ema_update)
from scripts import train as train_script

PREPROCESS = PreprocessConfig(image_size=8, resize_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_recipe_is_the_training_scripts_options():
    args = train_script.get_args_parser().parse_args(["--metadata", "m.csv", "--images", "i", "--output", "o", "--lr", "0.01",
                                                     "--imbalance", "focal", "--workers", "0"])
    recipe = Recipe.from_namespace(args)
    assert recipe.lr == 0.01 and recipe.imbalance == "focal" and recipe.workers == 0
    assert recipe == Recipe(lr=0.01, imbalance="focal")  # the script's defaults are the recipe's
    with pytest.raises(ValueError, match="imbalance"):
        Recipe(imbalance="oversample")


def test_class_weights_favour_rare_classes_and_keep_the_mean_loss_scale():
    counts = [10, 100, 1000, 0, 5, 50, 20]
    weights = class_weights(counts, 0.5)
    clamped = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    assert (weights * clamped).sum() == pytest.approx(clamped.sum())
    assert weights[0] > weights[1] > weights[2]
    assert torch.allclose(class_weights(counts, 0.0), torch.ones(7))


def test_criterion_follows_the_imbalance_handling():
    counts = [10, 100, 1000, 1, 5, 50, 20]
    assert isinstance(make_criterion(Recipe(imbalance="focal"), counts), FocalLoss)
    weighted = make_criterion(Recipe(imbalance="weighted_loss"), counts)
    assert torch.allclose(weighted.weight, class_weights(counts, 0.5))
    for plain in ("none", "sampler"):  # the sampler balances the data, so the loss is unweighted
        assert make_criterion(Recipe(imbalance=plain), counts).weight is None
    # Focal loss down-weights images the network already gets right.
    focal = FocalLoss(torch.ones(7), gamma=2.0, label_smoothing=0.0)
    confident, unsure = torch.tensor([[8.0, 0, 0, 0, 0, 0, 0]]), torch.tensor([[0.5, 0, 0, 0, 0, 0, 0]])
    target = torch.tensor([0])
    plain = nn.CrossEntropyLoss()
    assert focal(confident, target) / plain(confident, target) < focal(unsure, target) / plain(unsure, target)


def test_one_cycle_schedule_peaks_at_the_learning_rate_after_warmup():
    model = nn.Linear(4, 7)
    optimizer, scheduler = make_optimizer(model, Recipe(lr=0.1, epochs=2, warmup_fraction=0.25), steps_per_epoch=10)
    rates = []  # the rate of each of the 20 batches
    for _ in range(20):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert max(rates) == pytest.approx(0.1, rel=1e-3) and rates.index(max(rates)) == 4  # 5 warm-up batches
    assert rates[0] < 0.01 and rates[-1] < 1e-3


def test_ema_ramps_up_its_decay_and_is_optional():
    assert make_ema(nn.Linear(2, 2), 0.0) is None
    averaged, current = [torch.zeros(3)], [torch.ones(3)]
    update = warmup_ema_update(0.999)
    update(averaged, current, torch.tensor(0))
    # First step: decay min(0.999, 1/10), so the average moves 90% of the way.
    assert torch.allclose(averaged[0], torch.full((3,), 0.9))
    counts, current_counts = [torch.tensor(3)], [torch.tensor(5)]
    update(counts, current_counts, torch.tensor(100))
    assert int(counts[0]) == 5  # integer buffers (batch-norm counters) are copied, not averaged


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(0.3), nn.Linear(8, 7))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.body(inputs)


def tiny_run(recipe: Recipe) -> tuple[Trainer, torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    seed_everything(recipe.seed)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.arange(24) % 7
    data = torch.utils.data.TensorDataset(images, labels)
    train_loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(data, batch_size=8)
    model = TinyNet()
    optimizer, scheduler = make_optimizer(model, recipe, len(train_loader))
    trainer = Trainer(model, make_ema(model, recipe.ema_decay), optimizer, scheduler,
                      make_criterion(recipe, [4, 4, 4, 3, 3, 3, 3]), PREPROCESS, torch.device("cpu"))
    return trainer, train_loader, val_loader


def test_pausing_and_resuming_gives_the_uninterrupted_run(tmp_path):
    recipe = Recipe(epochs=3, batch_size=4, ema_decay=0.9, patience=10, seed=3)
    straight, train_loader, val_loader = tiny_run(recipe)
    (tmp_path / "straight").mkdir()
    assert run_epochs(straight, train_loader, val_loader, recipe, tmp_path / "straight", Progress())

    (tmp_path / "paused").mkdir()
    first, train_loader, val_loader = tiny_run(recipe)
    assert not run_epochs(first, train_loader, val_loader, recipe, tmp_path / "paused", Progress(), epochs_this_run=1)
    second, train_loader, val_loader = tiny_run(recipe)  # a new process: fresh weights, then last.pt
    progress = resume(tmp_path / "paused" / "last.pt", second)
    assert progress.start_epoch == 1 and len(progress.history) == 1
    assert run_epochs(second, train_loader, val_loader, recipe, tmp_path / "paused", progress)

    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    for name, tensor in straight.eval_model.state_dict().items():
        assert torch.equal(tensor, second.eval_model.state_dict()[name]), name
    rows = [json.loads(line) for line in (tmp_path / "paused" / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert [row["val_loss"] for row in rows] == [row["val_loss"] for row in straight_rows]
    assert (tmp_path / "paused" / "best_weights.pt").exists()
    assert resume(tmp_path / "nowhere.pt", second) is None


def test_saved_state_holds_the_progress(tmp_path):
    recipe = Recipe(epochs=2, batch_size=4, ema_decay=0.0)
    trainer, _, _ = tiny_run(recipe)
    progress = Progress(1, 0.25, 1, [{"epoch": 1}])
    save_state(tmp_path / "last.pt", trainer, progress, epoch=0)
    assert not (tmp_path / "last.pt.tmp").exists()
    other, _, _ = tiny_run(Recipe(epochs=2, batch_size=4, ema_decay=0.0, seed=9))
    restored = resume(tmp_path / "last.pt", other)
    assert (restored.start_epoch, restored.best_score, restored.best_epoch, restored.history) == (1, 0.25, 1, [{"epoch": 1}])
    assert all(torch.equal(t, other.model.state_dict()[n]) for n, t in trainer.model.state_dict().items())
