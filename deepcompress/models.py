"""Reference models: LeNet-300-100, Caffe's LeNet-5 (also with BatchNorm, for network slimming)
and a LeNet-300-100 sized for 8x8 digits."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class LeNet300(nn.Module):
    """Fully connected in_features-300-100-10 network with ReLU; flattens its input."""

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits for a (N, 1, H, W) or (N, in_features) batch."""
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe's LeNet-5: conv 20@5x5, max-pool, conv 50@5x5, max-pool, fc 500, ReLU, fc 10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits for a (N, 1, 28, 28) batch."""
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class LeNet300BN(LeNet300):
    """LeNet-300-100 with a BatchNorm after each hidden layer (network slimming prunes by their scales)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__(in_features, num_classes)
        self.bn1 = nn.BatchNorm1d(300)
        self.bn2 = nn.BatchNorm1d(100)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits for a (N, 1, H, W) or (N, in_features) batch."""
        x = torch.relu(self.bn1(self.fc1(torch.flatten(x, 1))))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


class LeNet5BN(LeNet5):
    """LeNet-5 with a BatchNorm after each hidden layer (network slimming prunes by their scales)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.bn1 = nn.BatchNorm2d(20)
        self.bn2 = nn.BatchNorm2d(50)
        self.bn3 = nn.BatchNorm1d(500)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits for a (N, 1, 28, 28) batch."""
        x = nn.functional.max_pool2d(self.bn1(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(self.bn2(self.conv2(x)), 2)
        x = torch.relu(self.bn3(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


def lenet300(in_features: int = 784) -> LeNet300:
    """LeNet-300-100 for 28x28 MNIST (266,610 parameters); pass in_features for other inputs."""
    return LeNet300(in_features)


def lenet300_bn() -> LeNet300BN:
    """LeNet-300-100 with BatchNorm after fc1 and fc2 (267,410 parameters), for network slimming."""
    return LeNet300BN()


def lenet5() -> LeNet5:
    """Caffe's LeNet-5 for (N, 1, 28, 28) MNIST (431,080 parameters)."""
    return LeNet5()


def lenet5_bn() -> LeNet5BN:
    """LeNet-5 with BatchNorm after conv1, conv2 and fc1 (432,220 parameters), for network slimming."""
    return LeNet5BN()


def digits_mlp() -> LeNet300:
    """LeNet-300-100 with 64 inputs, for scikit-learn's 8x8 digits."""
    return LeNet300(in_features=64)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "lenet300": lenet300,
    "lenet300_bn": lenet300_bn,
    "lenet5": lenet5,
    "lenet5_bn": lenet5_bn,
    "digits_mlp": digits_mlp,
}
