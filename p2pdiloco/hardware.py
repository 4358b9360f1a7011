"""What a peer runs on: its device, CPU threads, micro-batch and emulated slowness, and the
profiles in `peers/` that hold ready settings for kinds of hardware.

None of this changes what the run trains, so peers of one run may differ in all of it: a GPU peer
takes bigger batches than a laptop, and each peer's contribution to an average is weighted by the
tokens it processed. A profile is a TOML file with only such peer-local fields:

    batch_size = 16          # sequences per step on this hardware
    [hardware]
    device = "cuda"
    micro_batch = 8          # accumulation = batch_size / micro_batch = 2
    [swarm]
    reduce_timeout_s = 30    # a slow uplink needs longer to move its parts

Precedence: the profile, then a `--config` file, then command-line options.
"""
from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

# Fields a profile may set: hardware, not the run (the run's own fields must agree across peers).
PROFILE_FIELDS = {"batch_size", "hardware", "swarm"}
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class HardwareConfig:
    device: str = "auto"  # auto: cuda if present, else mps, else cpu
    threads: int = 0  # torch CPU threads (0: torch's default)
    micro_batch: int = 0  # sequences per forward/backward; the step accumulates batch_size / micro_batch (0: all)
    slowdown: float = 1.0  # emulate slower hardware: every step takes this many times its compute time

    def validate(self, batch_size: int) -> "HardwareConfig":
        if self.device not in DEVICES:
            raise ValueError(f"hardware.device '{self.device}' is unknown; use one of {', '.join(DEVICES)}")
        if self.threads < 0:
            raise ValueError(f"hardware.threads must be ≥ 0 (0: torch's default), got {self.threads}")
        if self.micro_batch < 0 or (self.micro_batch and batch_size % self.micro_batch):
            raise ValueError(f"hardware.micro_batch ({self.micro_batch}) must divide batch_size ({batch_size}); "
                             f"accumulation is batch_size / micro_batch")
        if not self.slowdown >= 1:
            raise ValueError(f"hardware.slowdown must be ≥ 1 (1: full speed), got {self.slowdown}")
        return self

    def accumulation(self, batch_size: int) -> int:
        return batch_size // self.micro_batch if self.micro_batch else 1


def resolve_device(name: str) -> torch.device:
    """The device to train on, with an error that says what to do when it is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("hardware.device is cuda but torch sees no CUDA device (or this torch is a CPU build); "
                         "use --device cpu, or install a CUDA build of torch (P2PDILOCO_TORCH=torch, README)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError("hardware.device is mps but this machine has no Apple GPU available to torch; use --device cpu")
    return torch.device(name)


def profile_dirs() -> list[Path]:
    """Where named profiles live: the repository's peers/ (a checkout or an editable install) and
    the copy a wheel installs under <prefix>/share/p2pdiloco/peers."""
    return [Path(__file__).resolve().parents[1] / "peers", Path(sys.prefix) / "share" / "p2pdiloco" / "peers"]


def profile_names() -> list[str]:
    return sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.toml")})


def load_profile(name_or_path: str) -> dict:
    """A profile's fields as a mapping, checked to hold only peer-local fields."""
    path = Path(name_or_path)
    if not path.is_file():
        found = [d / f"{name_or_path}.toml" for d in profile_dirs() if (d / f"{name_or_path}.toml").is_file()]
        if not found:
            raise ValueError(f"--profile '{name_or_path}' is neither a file nor a named profile; "
                             f"named profiles: {', '.join(profile_names()) or 'none found'}")
        path = found[0]
    try:
        mapping = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--profile: '{path}' is not valid TOML: {exc}") from exc
    extra = sorted(set(mapping) - PROFILE_FIELDS)
    if extra:
        raise ValueError(f"--profile '{path}' sets {', '.join(extra)}: a profile holds only what depends on the "
                         f"hardware ({', '.join(sorted(PROFILE_FIELDS))}); put the run's settings in --config")
    for table in ("hardware", "swarm"):
        if not isinstance(mapping.get(table, {}), dict):
            raise ValueError(f"--profile '{path}': '{table}' must be a table of fields")
    return mapping
