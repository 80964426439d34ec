"""Training losses that need no pretrained network.

There is no VGG perceptual loss: no pretrained weights can be downloaded here, and a
randomly initialised VGG is not a perceptual measure. Instead: an image-pyramid L1,
SSIM, FOMM's equivariance losses, and a separation prior that keeps keypoints apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.fomm.blocks import inverse_2x2, make_coordinate_grid


def pyramid_l1(pred: torch.Tensor, target: torch.Tensor,
               scales: tuple[float, ...] = (1, 0.5, 0.25, 0.125)) -> torch.Tensor:
    """Mean L1 over an image pyramid: coarse scales give gradients for large motions."""
    loss = pred.new_zeros(())
    for s in scales:
        if s == 1:
            p, t = pred, target
        else:
            p = F.interpolate(pred, scale_factor=s, mode="area")
            t = F.interpolate(target, scale_factor=s, mode="area")
        loss = loss + (p - t).abs().mean()
    return loss / len(scales)


def _gaussian_window(size: int = 7, sigma: float = 1.5, device: torch.device | None = None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean SSIM (Gaussian window) over the batch, images in [0, 1]."""
    c = pred.shape[1]
    w = _gaussian_window(window, device=pred.device).expand(c, 1, window, window)
    pad = window // 2
    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [pad] * 4, mode="reflect"), w, groups=c)
    mu_x, mu_y = filt(pred), filt(target)
    sxx = filt(pred * pred) - mu_x ** 2
    syy = filt(target * target) - mu_y ** 2
    sxy = filt(pred * target) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.mean()


class RandomTransform:
    """Random affine + thin-plate-spline warp of the plane (FOMM's equivariance transform)."""

    def __init__(self, batch: int, sigma_affine: float = 0.05, sigma_tps: float = 0.005,
                 points_tps: int = 5, device: torch.device | None = None) -> None:
        noise = torch.randn(batch, 2, 3, device=device) * sigma_affine
        self.theta = noise + torch.eye(2, 3, device=device)[None]
        self.control = make_coordinate_grid(points_tps, points_tps, device=device).view(1, -1, 2)
        self.control_params = torch.randn(batch, 1, points_tps ** 2, device=device) * sigma_tps

    def warp_coordinates(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (B, N, 2) -> transformed (B, N, 2)."""
        theta = self.theta.to(coords.dtype)
        out = torch.einsum("bij,bnj->bni", theta[:, :, :2], coords) + theta[:, None, :, 2]
        dist = (coords[:, :, None, :] - self.control[:, None]).abs().sum(-1)  # B,N,P
        r2 = dist ** 2
        u = r2 * torch.log(dist + 1e-6)
        out = out + (u * self.control_params).sum(-1, keepdim=True)
        return out

    def transform_frame(self, frame: torch.Tensor) -> torch.Tensor:
        b, _, h, w = frame.shape
        grid = make_coordinate_grid(h, w, device=frame.device).view(1, -1, 2).expand(b, -1, -1)
        grid = self.warp_coordinates(grid).view(b, h, w, 2)
        return F.grid_sample(frame, grid, mode="bilinear", padding_mode="reflection", align_corners=True)

    def jacobian(self, coords: torch.Tensor) -> torch.Tensor:
        """d warp / d coords at each point, (B, N, 2, 2)."""
        coords = coords.detach().requires_grad_(True)
        with torch.enable_grad():
            new = self.warp_coordinates(coords)
            gx = torch.autograd.grad(new[..., 0].sum(), coords, create_graph=True)[0]
            gy = torch.autograd.grad(new[..., 1].sum(), coords, create_graph=True)[0]
        return torch.stack([gx, gy], dim=-2)


def equivariance_losses(kp_detector: torch.nn.Module, driving: torch.Tensor,
                        kp_driving: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints must move with a known warp of the frame: kp(x) = T(kp(T^-1 x))."""
    t = RandomTransform(driving.shape[0], device=driving.device)
    transformed = t.transform_frame(driving)
    kp_t = kp_detector(transformed)
    value_loss = (kp_driving["value"] - t.warp_coordinates(kp_t["value"])).abs().mean()
    jac = t.jacobian(kp_t["value"]) @ kp_t["jacobian"]
    eye = torch.eye(2, device=driving.device)
    jac_loss = (eye - inverse_2x2(kp_driving["jacobian"]) @ jac).abs().mean()
    return value_loss, jac_loss


def separation_loss(kp_value: torch.Tensor, min_distance: float = 0.2) -> torch.Tensor:
    """Penalise keypoint pairs closer than ``min_distance`` so they don't collapse together."""
    d = torch.cdist(kp_value, kp_value)  # B,K,K
    k = kp_value.shape[1]
    off = ~torch.eye(k, dtype=torch.bool, device=kp_value.device)
    return F.relu(min_distance - d[:, off]).pow(2).mean() / (min_distance ** 2)


def keypoint_spread(kp_value: torch.Tensor) -> torch.Tensor:
    """Mean distance of keypoints from their centroid (collapse detector)."""
    return (kp_value - kp_value.mean(1, keepdim=True)).norm(dim=-1).mean()
