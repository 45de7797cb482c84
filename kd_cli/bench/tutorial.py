"""The plain side: the official PyTorch KD tutorial's loop, as users write it by hand.

torchvision's CIFAR10 dataset (PIL images) -> ToTensor + Normalize -> DataLoader(shuffle, 2 workers)
-> the teacher's forward under no_grad on every step -> `loss.item()` on every step.
"""

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F

BATCH_SIZE = 128
T, ALPHA = 2.0, 0.25  # the tutorial's temperature; kd's alpha weights KD, so CE gets 1 - alpha = 0.75
LR = 1e-3  # the tutorial's Adam


def _torchvision_cifar10():
    from torchvision.datasets import CIFAR10

    class RandomPixelCIFAR10(CIFAR10):
        """torchvision's CIFAR10 reading our files: they have CIFAR-10's format but not its md5 sums.

        torchvision checks every batch file (and batches.meta) against the md5 of the real
        download and refuses anything else; the reading itself is left untouched.
        """

        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return RandomPixelCIFAR10


def plain_dataset(root: Path, mean, std, augment: bool):
    """The tutorial's dataset: torchvision CIFAR10 -> (RandomCrop + flip) -> ToTensor -> Normalize."""
    from torchvision import transforms

    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean=list(mean), std=list(std))])
    return _torchvision_cifar10()(root=str(root), train=True, download=False, transform=transform)


def tutorial_kd_loss(student_logits, teacher_logits, labels, T: float, soft_target_loss_weight: float,
                     ce_loss_weight: float):
    """The tutorial's loss, in its own words: KL written out, summed and divided by the batch size."""
    soft_targets = F.softmax(teacher_logits / T, dim=-1)
    soft_prob = F.log_softmax(student_logits / T, dim=-1)
    soft_targets_loss = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] * (T**2)
    label_loss = F.cross_entropy(student_logits, labels)
    return soft_target_loss_weight * soft_targets_loss + ce_loss_weight * label_loss


def plain_kd_step(teacher, student, optimizer, inputs, labels) -> float:
    optimizer.zero_grad()
    with torch.no_grad():
        teacher_logits = teacher(inputs)
    student_logits = student(inputs)
    loss = tutorial_kd_loss(student_logits, teacher_logits, labels, T, ALPHA, 1 - ALPHA)
    loss.backward()
    optimizer.step()
    return loss.item()  # the tutorial's running_loss += loss.item(): a host sync per step, as users write it


def plain_ce_step(model, optimizer, inputs, labels) -> float:
    optimizer.zero_grad()
    loss = F.cross_entropy(model(inputs), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def plain_epoch(loader, step, device: torch.device) -> int:
    """One pass over `loader` with `step(inputs, labels)`; returns the images seen."""
    seen, running_loss = 0, 0.0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        running_loss += step(inputs, labels)
        seen += len(labels)
    return seen
