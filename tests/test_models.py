"""transfer_learning.models: backbones and their blocks, local state dicts, the head, losses
and probabilities. Real torchvision models with random weights (or a local state dict)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from transfer_learning import metrics, models, train


@pytest.mark.parametrize(
    "backbone, dim",
    [("mobilenet_v2", 1280), ("resnet18", 512), ("resnet50", 2048), ("efficientnet_b0", 1280)],
)
def test_build_backbone_gives_pooled_features(backbone, dim):
    torch.manual_seed(0)
    model = models.build_backbone(backbone, None)
    assert models.feature_dim(model, 32) == dim
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert tuple(out.shape) == (2, dim)
    # No Linear layer is left: the classifier is gone.
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


def test_unknown_backbone_names_the_key():
    with pytest.raises(ValueError, match=r"mobilenet_v9.*model\.backbone"):
        models.build_backbone("mobilenet_v9")


def test_mobilenet_v2_blocks_and_course_trainable_parameters():
    model = models.build_backbone("mobilenet_v2")
    blocks = models.backbone_blocks(model)
    assert len(blocks) == 19
    assert all(a is b for a, b in zip(blocks, model.features, strict=True))
    assert models.default_unfreeze_blocks(len(blocks)) == 5

    classifier = models.Classifier(model, models.Head(1280, 2))
    frozen = models.set_trainable(classifier, None)
    assert frozen == blocks[:14]
    trainable, fixed = models.count_parameters(classifier)
    # The course: features[14..18] and the head train, about 1.68 M parameters.
    assert 1.6e6 <= trainable <= 1.8e6, trainable
    expected = sum(p.numel() for b in model.features[14:] for p in b.parameters()) + 1280 + 1
    assert trainable == expected
    assert trainable + fixed == sum(p.numel() for p in classifier.parameters())
    for i, block in enumerate(model.features):
        assert all(p.requires_grad == (i >= 14) for p in block.parameters())

    # Frozen blocks stay in eval mode while training (their BatchNorm statistics too).
    models.train_mode(classifier, frozen)
    assert all(not m.training for b in frozen for m in b.modules())
    assert all(m.training for m in model.features[14].modules())

    # An explicit count, and zero: only the head trains.
    models.set_trainable(classifier, 2)
    assert models.count_parameters(classifier)[0] == (
        sum(p.numel() for b in model.features[17:] for p in b.parameters()) + 1281
    )
    models.set_trainable(classifier, 0)
    assert models.count_parameters(classifier)[0] == 1281


def test_local_state_dict_loads_and_ignores_another_classifier(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.mobilenet_v2(num_classes=10)  # a 10-class classifier
    path = tmp_path / "mine.pth"
    torch.save(source.state_dict(), path)
    model = models.build_backbone("mobilenet_v2", path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    # Wrapped the way training scripts often save it.
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, wrapped)
    again = models.build_backbone("mobilenet_v2", wrapped)
    assert torch.equal(again.features[0][0].weight, source.features[0][0].weight)


def test_state_dict_of_another_architecture_names_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError) as error:
        models.build_backbone("mobilenet_v2", path)
    text = str(error.value)
    assert "do not fit backbone MobileNetV2" in text
    assert "missing keys: features." in text
    assert "unexpected keys: bn1.bias" in text and "bn1.weight" in text

    narrow = tmp_path / "narrow.pth"
    torch.save(torchvision.models.mobilenet_v2(width_mult=0.5).state_dict(), narrow)
    with pytest.raises(ValueError, match="keys of another shape: features.0.0.weight"):
        models.build_backbone("mobilenet_v2", narrow)
    with pytest.raises(FileNotFoundError, match="model.weights"):
        models.build_backbone("mobilenet_v2", tmp_path / "absent.pth")


def test_head_standardises_with_training_statistics():
    torch.manual_seed(0)
    # Random-init features are tiny; one column is constant.
    features = torch.randn(200, 3, dtype=torch.float64).float() * 1e-10 + 5e-10
    features[:, 2] = 7.0
    head = models.Head(3, 3, dropout=0.5)
    head.fit_standardisation(features)
    with torch.no_grad():
        head.linear.weight.copy_(torch.eye(3))
        head.linear.bias.zero_()
    head.eval()
    with torch.no_grad():
        out = head(features)
    assert torch.isfinite(out).all()
    assert out[:, :2].mean(0).abs().max() < 1e-3
    assert (out[:, :2].std(0) - 1).abs().max() < 1e-3
    assert torch.equal(out[:, 2], torch.zeros(200))  # constant column: std 1, not 0
    assert head.std[2] == 1.0
    # The statistics are buffers: they travel with the state dict.
    assert {"mean", "std"} <= set(head.state_dict())


def test_binary_and_multiclass_heads_losses_and_probabilities():
    torch.manual_seed(0)
    binary, three = models.Head(4, 2), models.Head(4, 3)
    assert binary.linear.out_features == 1 and three.linear.out_features == 3
    assert isinstance(models.loss_function(2), nn.BCEWithLogitsLoss)
    assert isinstance(models.loss_function(3), nn.CrossEntropyLoss)

    logits = torch.tensor([[2.0], [-1.0], [0.0]])
    labels = torch.tensor([1, 0, 0])
    probs = models.probabilities(logits, 2)
    assert probs.shape == (3, 2)
    assert torch.allclose(probs[:, 1], torch.sigmoid(logits[:, 0]))
    assert torch.allclose(probs.sum(1), torch.ones(3))
    assert train.correct_predictions(logits, labels, 2) == 3  # 0.0 is class 0
    # The training loss is the log loss of the probabilities the evaluation reports.
    loss = models.loss_function(2)(
        models.logits_for_loss(logits, 2), models.loss_targets(labels, 2)
    )
    assert float(loss) == pytest.approx(metrics.log_loss(labels.numpy(), probs.numpy()), rel=1e-6)

    logits3 = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0], [4.0, -1.0, 0.0]])
    labels3 = torch.tensor([2, 1, 0])
    probs3 = models.probabilities(logits3, 3)
    assert torch.allclose(probs3, torch.softmax(logits3, 1))
    assert train.correct_predictions(logits3, labels3, 3) == 2
    loss3 = models.loss_function(3)(
        models.logits_for_loss(logits3, 3), models.loss_targets(labels3, 3)
    )
    assert float(loss3) == pytest.approx(
        metrics.log_loss(labels3.numpy(), probs3.numpy()), rel=1e-6
    )
