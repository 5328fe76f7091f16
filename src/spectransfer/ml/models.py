"""The 1-D VGG networks (A, B, D, E) and the run-folder weights format that rebuilds them.

VGG Net-A in one dimension is the paper's classifier (Podsztavek et al. 2021): 3-wide
convolutions with padding 1 and ReLU, a max-pool of 2 after each block, then a dense head
8192 -> 1024 -> 1024 -> 1 logit with dropout 0.5, no batch norm, Xavier-uniform weights and
zero biases. The channel widths are the authors' (VGG's divided by four). B, D and E deepen
the blocks exactly as in Simonyan & Zisserman (2014), tables 1, at the same widths.

A model file alone rebuilds its network: ``model.safetensors`` carries the model config,
the grid, the package version and the training mode in its metadata (nanoGPT keeps the
config inside the checkpoint for the same reason).

The optional redshift head branches from the same trunk features as the classifier (which
stays the paper's) and gives a probability distribution over redshift bins uniform in
ln(1+z) on [0, 7], trained with cross-entropy against Gaussian-smoothed one-hot targets. A
distribution rather than a Gaussian (z, σ) output because the typical failure of a quasar
redshift is a line confusion (Mg II taken for C IV, say), which puts probability at two
distant redshifts: a distribution keeps both, its mode picks one, and the probability near
the mode says how far to trust it (``redshift_probability``), where a single Gaussian would
average the two into a redshift that is neither. Two heads: ``shift`` (``ShiftZHead``, new
runs: one rest-frame pattern matched at every redshift, since a redshift is a shift on the
logarithmic grid; 316 bins of 1975 km/s) and ``dense`` (8192 -> 256 -> dropout -> 300 bins of
2080 km/s, the first head; runs saved with it keep loading). Measured on the demo's simulated
SDSS store, fine-tuned 375 steps from the same LAMOST run: the dense head 38% catastrophic on
816 independent test quasars, the shift head (with ``train``'s redshift shifts) 7.8%, and 4.7%
when the LAMOST pretraining trains it too. The mean of the bins next to the mode
gives the sub-bin redshift (``redshift_from_head``), and the template fit (``ml.refine``)
takes it from there. ``z_bins = 0`` (the default, and what a model file saved without the
head says) means no redshift head.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spectransfer import __version__
from spectransfer.config import Grid
from spectransfer.errors import TrainError
from spectransfer.ml.refine import C_KMS, CATASTROPHIC_KMS
from spectransfer.provenance import atomic_path, sha256_file

log = logging.getLogger(__name__)

# Convolutions per block for each VGG configuration; widths of the five blocks below.
_BLOCK_DEPTHS: dict[str, tuple[int, ...]] = {
    "vgg-a": (1, 1, 2, 2, 2),
    "vgg-b": (2, 2, 2, 2, 2),
    "vgg-d": (2, 2, 3, 3, 3),
    "vgg-e": (2, 2, 4, 4, 4),
}
_BLOCK_WIDTHS = (16, 32, 64, 128, 128)
MODEL_NAMES = tuple(_BLOCK_DEPTHS)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network: its VGG name, input length and channels.

    ``in_channels`` is 1 for the paper's input (normalised flux only); 2 adds a second
    channel derived from the inverse variance (see ``spectransfer.ml.dataset.make_input``).
    """

    name: str = "vgg-a"
    n_bins: int = 2048
    in_channels: int = 1
    dropout: float = 0.5
    hidden: int = 1024
    z_bins: int = 0  # 0: no redshift head (the paper's network; every run saved before the head)
    z_hidden: int = 256
    z_head_kind: str = "dense"  # "dense" (runs saved before "shift" existed) or "shift" (see ShiftZHead)

    def __post_init__(self) -> None:
        if self.name not in _BLOCK_DEPTHS:
            raise TrainError(f"unknown model {self.name!r}; choose one of {', '.join(MODEL_NAMES)}")
        if self.n_bins % 32 != 0:
            raise TrainError(f"n_bins must be a multiple of 32 (five max-pools of 2), got {self.n_bins}")
        if self.in_channels not in (1, 2):
            raise TrainError(f"in_channels must be 1 (flux) or 2 (flux + ivar), got {self.in_channels}")
        if self.z_bins < 0 or self.z_bins == 1:
            raise TrainError(f"z_bins must be 0 (no redshift head) or >= 2, got {self.z_bins}")
        if self.z_head_kind not in Z_HEAD_KINDS:
            raise TrainError(f"z_head_kind must be one of {', '.join(Z_HEAD_KINDS)}, got {self.z_head_kind!r}")
        if self.z_head_kind == "shift" and self.z_bins % ShiftZHead.PHASES:
            raise TrainError(f"a shift z head needs an even number of z_bins, got {self.z_bins}")

    @property
    def has_z_head(self) -> bool:
        return self.z_bins > 0

    def trunk(self) -> ModelConfig:
        """This config without its redshift head: what two runs must share to transfer weights."""
        return dataclasses.replace(self, z_bins=0, z_hidden=ModelConfig.z_hidden, z_head_kind=ModelConfig.z_head_kind)

    @property
    def flat_features(self) -> int:
        return _BLOCK_WIDTHS[-1] * (self.n_bins // 32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        keys = ("name", "n_bins", "in_channels", "dropout", "hidden", "z_bins", "z_hidden", "z_head_kind")
        return cls(**{k: d[k] for k in keys if k in d})


class VGG1D(nn.Module):
    """A 1-D VGG network: input (batch, channels, n_bins) -> one logit per spectrum.

    ``forward(x)`` returns the logits alone (what scoring and ONNX export use);
    ``forward(x, with_z=True)`` returns (logits, z_logits), z_logits None without a z head.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = config.in_channels
        for depth, width in zip(_BLOCK_DEPTHS[config.name], _BLOCK_WIDTHS):
            for _ in range(depth):
                layers += [nn.Conv1d(c_in, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c_in = width
            layers.append(nn.MaxPool1d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(config.flat_features, config.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, 1),
        )
        self.z_head: nn.Module | None = None
        self.reset_parameters()
        if config.has_z_head:
            # built after the trunk's initialisation: with one seed, a network with and one
            # without the z head start from the same trunk and classifier weights
            if config.z_head_kind == "shift":
                self.z_head = ShiftZHead(_BLOCK_WIDTHS[-1], config.n_bins // 32, config.z_hidden, config.z_bins)
            else:
                self.z_head = nn.Sequential(
                    nn.Flatten(),
                    nn.Linear(config.flat_features, config.z_hidden),
                    nn.ReLU(inplace=True),
                    nn.Dropout(config.dropout),
                    nn.Linear(config.z_hidden, config.z_bins),
                )
            _xavier(self.z_head)

    def reset_parameters(self) -> None:
        _xavier(self)

    def forward(self, x: torch.Tensor, with_z: bool = False) -> Any:
        if x.dim() == 2:  # (batch, n_bins): the one-channel input without its channel axis
            x = x.unsqueeze(1)
        features = self.features(x)
        logits = self.head(features).squeeze(-1)
        if not with_z:
            return logits
        return logits, (self.z_head(features) if self.z_head is not None else None)


class ShiftZHead(nn.Module):
    """A redshift head that knows a redshift is a shift along the logarithmic grid.

    The trunk's last feature map (C, P) has one position per 32 grid bins, and redshifting a
    spectrum by 32 bins moves it by one position. So the logit of redshift bin j is one learnt
    rest-frame pattern W (hidden channels x (P + J - 1) rest positions) matched with the feature
    map at offset j: ``logit[j] = sum_c,p W[c, P - 1 + j - p] h[c, p] + prior[j]``, a template
    fit in feature space, like redrock's χ² scan in flux space. Every quasar, at whatever z,
    trains the same W; the dense head must learn each redshift's line positions apart, from
    the few training quasars near it. ``h`` is a 1x1 convolution of the trunk's features with
    a ReLU. The sum is one matrix product with a weight matrix gathered from W (a dense layer
    whose weights are tied along its diagonals): it exports to ONNX as a MatMul, where a direct
    conv1d with the 221-wide kernel took 12 s per training batch of 64 on 2 shared cores.

    ``z_bins`` = 2J bins uniform in ln(1+z) on [0, Z_MAX]: two phases per position, so a bin is
    16 grid bins wide (1975 km/s on the paper's grid, the 2J chosen by ``shift_z_bins`` so that
    this holds to 0.1% over 0-7).
    """

    PHASES = 2

    def __init__(self, channels: int, positions: int, hidden: int, z_bins: int) -> None:
        super().__init__()
        self.shifts = z_bins // self.PHASES
        self.mix = nn.Conv1d(channels, hidden, kernel_size=1)
        self.pattern = nn.Parameter(torch.empty(self.PHASES, hidden, positions + self.shifts - 1))
        self.prior = nn.Parameter(torch.zeros(z_bins))
        nn.init.xavier_uniform_(self.pattern)
        j, p = np.arange(self.shifts)[:, None], np.arange(positions)[None, :]
        self.register_buffer("index", torch.from_numpy(positions - 1 + j - p), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mix(features))  # (B, hidden, P)
        tied = self.pattern[:, :, self.index]  # (PHASES, hidden, J, P): W[φ, c, P - 1 + j - p]
        weight = tied.permute(2, 0, 1, 3).reshape(self.prior.shape[0], -1)  # row PHASES·j + φ
        return h.flatten(1) @ weight.t() + self.prior


def shift_z_bins(log_step: float) -> int:
    """Bins of a ShiftZHead on a grid of ``log_step`` (log10 per bin): two per 32 grid bins, 0 to Z_MAX."""
    return ShiftZHead.PHASES * max(1, round(float(np.log10(1.0 + Z_MAX)) / (32 * log_step)))


def forward_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Both heads of ``model`` on ``x``: {"logit": (B,), "z_logits": (B, z_bins) or None}."""
    logits, z_logits = model(x, with_z=True)
    return {"logit": logits, "z_logits": z_logits}


# ---- the redshift bins -------------------------------------------------------------------

Z_MAX = 7.0
Z_BINS = 300  # the dense head's bins: 2080 km/s each
Z_HEAD_KINDS = ("dense", "shift")


def z_bin_edges(n_bins: int) -> np.ndarray:
    """Edges (n_bins + 1,) of the redshift bins: uniform in ln(1+z) from z = 0 to Z_MAX."""
    return np.expm1(np.linspace(0.0, np.log1p(Z_MAX), n_bins + 1))


def z_bin_centres(n_bins: int) -> np.ndarray:
    """Centres (n_bins,) of the redshift bins in ln(1+z) (mid-points of the edges in ln(1+z))."""
    u = np.linspace(0.0, np.log1p(Z_MAX), n_bins + 1)
    return 0.5 * (u[1:] + u[:-1])


def z_targets(z: torch.Tensor, n_bins: int, sigma_bins: float = 1.0) -> torch.Tensor:
    """Soft targets (B, n_bins): a Gaussian of ``sigma_bins`` bins around each z, summing to 1."""
    u = torch.log1p(z.clamp(0.0, Z_MAX)).to(torch.float32)
    centres = torch.as_tensor(z_bin_centres(n_bins), dtype=torch.float32, device=z.device)
    width = float(np.log1p(Z_MAX)) / n_bins
    g = torch.exp(-0.5 * ((centres[None, :] - u[:, None]) / (sigma_bins * width)) ** 2)
    return g / g.sum(dim=1, keepdim=True)


def redshift_from_head(z_logits: np.ndarray | torch.Tensor, around_mode: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The network's redshift and its uncertainty from z-head logits (B, n_bins).

    z: the probability-weighted mean of ln(1+z) over the ``around_mode`` bins either side of
    the most probable bin (sub-bin precision without averaging two rival peaks). z_err: the
    half-width around z that holds 68% of the head's probability (each bin's probability
    spread evenly over it in ln(1+z)), as (1+z)·sinh(r) for the radius r in ln(1+z). A single
    peak gives its width (1σ for a Gaussian); when the peak holds less than 68%, the interval
    must reach the rival redshifts and the error grows to their distance, and it is measured
    around the z we give, not the mean. It flags failures at least as well as the standard
    deviation: on 816 simulated test quasars (two runs) the 10% with the largest std held 24%
    and 33% catastrophic redshifts, those with the largest 68% half-width 35% and 33%.
    """
    p = _probabilities(z_logits)
    n = p.shape[1]
    u = z_bin_centres(n)
    mode = p.argmax(axis=1)
    near = np.abs(np.arange(n)[None, :] - mode[:, None]) <= around_mode
    pn = np.where(near, p, 0.0)
    centre = (pn * u).sum(axis=1) / pn.sum(axis=1)
    z = np.expm1(centre)
    r = _radius_holding(p, centre, 0.68)
    return z, (1.0 + z) * np.sinh(r)


def _probabilities(z_logits: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(z_logits, torch.Tensor):
        z_logits = z_logits.detach().float().cpu().numpy()
    logits = np.asarray(z_logits, dtype=np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _mass_between(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Probability (B,) in [lo, hi] of ln(1+z), each bin's mass uniform over the bin."""
    n = p.shape[1]
    width = float(np.log1p(Z_MAX)) / n
    before = np.concatenate([np.zeros((p.shape[0], 1)), np.cumsum(p, axis=1)], axis=1)  # mass below edge k
    rows = np.arange(p.shape[0])

    def cdf(x: np.ndarray) -> np.ndarray:
        t = np.clip(x / width, 0.0, float(n))
        k = np.minimum(np.floor(t).astype(np.int64), n - 1)
        return before[rows, k] + p[rows, k] * (t - k)

    return cdf(hi) - cdf(lo)


def _radius_holding(p: np.ndarray, centre: np.ndarray, mass: float) -> np.ndarray:
    """The radius r (B,) in ln(1+z) for which [centre - r, centre + r] holds ``mass`` (bisection)."""
    lo = np.zeros(p.shape[0])
    hi = np.full(p.shape[0], float(np.log1p(Z_MAX)))
    for _ in range(40):  # 2.08 / 2**40: far below any bin
        mid = 0.5 * (lo + hi)
        enough = _mass_between(p, centre - mid, centre + mid) >= mass
        hi = np.where(enough, mid, hi)
        lo = np.where(enough, lo, mid)
    return hi


def redshift_probability(
    z_logits: np.ndarray | torch.Tensor, z: np.ndarray, half_width_kms: float = CATASTROPHIC_KMS
) -> np.ndarray:
    """Probability (B,) the head gives to a true redshift within ``half_width_kms`` of ``z``.

    |Δv| = c·|z - z_true|/(1 + z_true) <= v is z_true in [(1+z)/(1+v/c) - 1, (1+z)/(1-v/c) - 1],
    an interval of ln(1+z); each bin's probability counts in proportion to its overlap with it
    (uniform in ln(1+z) within the bin). With the default 3000 km/s, one minus it is the head's
    own probability that ``z`` is a catastrophic failure. It flags failures best of what we
    tried (std, 68% half-width, entropy, peak height): on 816 simulated test quasars (two
    runs) the 10% with the lowest probability held 39-44% catastrophic redshifts, the other
    90% 0.8-3.8%.
    """
    p = _probabilities(z_logits)
    u = np.log1p(np.asarray(z, dtype=np.float64))
    beta = half_width_kms / C_KMS
    return _mass_between(p, u - np.log1p(beta), u - np.log1p(-beta))


def _xavier(module: nn.Module) -> None:
    """Glorot & Bengio (2010) uniform weights and zero biases, as the authors' Keras model."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_model(config: ModelConfig) -> VGG1D:
    """A freshly initialised network for ``config``."""
    return VGG1D(config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class RunInfo:
    """What a run folder says about its model (see ``load_run``)."""

    run_dir: Path
    model_name: str
    model_config: ModelConfig
    grid: Grid
    config: dict[str, Any]
    sha256: str
    temperature: float | None
    mode: str
    version: str


def save_weights(model: VGG1D, path: str | Path, grid: Grid, mode: str, extra: dict[str, str] | None = None) -> None:
    """Write the weights as safetensors with the model config, grid, version and mode in
    the metadata; written to a temporary name in the same folder, then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unwrap(model).state_dict().items()}
    metadata = {
        "format": "spectransfer-model",
        "model_config": json.dumps(unwrap(model).config.to_dict()),
        "grid": json.dumps(grid.to_dict()),
        "spectransfer_version": __version__,
        "mode": mode,
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a ``model.safetensors``; TrainError if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise TrainError(f"{path}: not a readable safetensors file ({exc})") from exc
    if "model_config" not in metadata or "grid" not in metadata:
        raise TrainError(f"{path}: safetensors file lacks the spectransfer model config/grid metadata")
    return tensors, metadata


def load_weights(path: str | Path) -> tuple[VGG1D, ModelConfig, Grid, dict[str, str]]:
    """Rebuild the network stored in ``path`` (eval mode)."""
    tensors, metadata = read_weights(path)
    try:
        config = ModelConfig.from_dict(json.loads(metadata["model_config"]))
        grid = Grid.from_dict(json.loads(metadata["grid"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"{path}: unreadable model metadata ({exc})") from exc
    model = build_model(config)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise TrainError(f"{path}: weights do not fit model {config.name} ({exc})") from exc
    model.eval()
    return model, config, grid, metadata


def load_init_weights(model: VGG1D, tensors: dict[str, torch.Tensor], source: str | Path) -> list[str]:
    """Load a pretrained run's tensors into ``model`` for transfer; returns what was not loaded.

    Every trunk and classifier tensor must fit. A redshift head follows the new run: an init
    run without one leaves ``model``'s freshly initialised z head in place, and an init run's
    z head is dropped when ``model`` has none.
    """
    own = model.state_dict()
    z_keys = [k for k in own if k.startswith("z_head.")]
    take = {k: v for k, v in tensors.items() if not (k.startswith("z_head.") and k not in own)}
    if z_keys and not all(k in take and take[k].shape == own[k].shape for k in z_keys):
        take = {k: v for k, v in take.items() if not k.startswith("z_head.")}  # none, or another kind
    try:
        result = model.load_state_dict(take, strict=False)
    except RuntimeError as exc:
        raise TrainError(f"{source}: weights do not fit model {model.config.name} ({exc})") from exc
    missing = [k for k in result.missing_keys if not k.startswith("z_head.")]
    if missing or result.unexpected_keys:
        raise TrainError(
            f"{source}: weights do not fit model {model.config.name} (missing {missing}, unexpected {result.unexpected_keys})"
        )
    fresh = list(result.missing_keys)
    if fresh:
        log.info("%s holds no redshift head of this kind: the z head starts from fresh weights", source)
    return fresh


def load_run(run_dir: str | Path) -> tuple[VGG1D, RunInfo]:
    """The best model of a run folder (eval mode) and what the folder says about it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrainError(f"{run_dir}: not a run folder")
    weights = run_dir / "model.safetensors"
    model, mconfig, grid, metadata = load_weights(weights)
    config: dict[str, Any] = {}
    if (run_dir / "config.toml").is_file():
        import tomllib

        with open(run_dir / "config.toml", "rb") as fh:
            config = tomllib.load(fh)
    temperature = None
    calib = run_dir / "calibration.json"
    if calib.is_file():
        try:
            temperature = float(json.loads(calib.read_text())["temperature"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TrainError(f"{calib}: unreadable calibration ({exc})") from exc
    info = RunInfo(
        run_dir=run_dir,
        model_name=mconfig.name,
        model_config=mconfig,
        grid=grid,
        config=config,
        sha256=sha256_file(weights),
        temperature=temperature,
        mode=metadata.get("mode", "unknown"),
        version=metadata.get("spectransfer_version", "unknown"),
    )
    return model, info


def unwrap(model: nn.Module) -> VGG1D:
    """The VGG1D inside a DistributedDataParallel (or torch.compile) wrapper."""
    while hasattr(model, "module") and not isinstance(model, VGG1D):
        model = model.module  # type: ignore[assignment]
    return model  # type: ignore[return-value]
