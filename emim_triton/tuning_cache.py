"""Where autotuned launch configurations live: one JSON file per GPU model, and the shipped defaults.

A user cache file (``$EMIM_TRITON_CACHE``, else ``$XDG_CACHE_HOME/emim_triton`` or
``~/.cache/emim_triton``) is named after the device, e.g. ``nvidia-h200-sm90.json``:

    {"format": 1, "device": "NVIDIA H200", "capability": [9, 0],
     "triton": "3.6.0", "kernel_version": "3f2a...",
     "entries": {"bf16/K7/D64/h16w16s4096": {"forward": {...}, "backward_query": {...}, ..., "info": {...}}}}

Device, Triton version and kernel version are in the header: a file made under any other is stale and
ignored (the kernels or the compiler changed, so its timings say nothing any more). Entries are keyed by
dtype, window K, head dim D and a shape bucket (`shape_bucket`). The file is read once, at first use;
writes go to a temporary file in the same directory and replace the old one in one step (os.replace), so
a reader never sees half a file. A corrupt or stale file is ignored with one warning, never an error.

Shipped defaults (``emim_triton/tuned/tuned_configs.json``) have the same entries, grouped by device;
they are measured configurations for known GPUs and are used when the user cache has nothing.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .checks import EMIMShape
from .output_paths import write_atomic
from .launch_configs import EMIMConfigs, KERNELS, RowConfig, TileConfig, next_power_of_2

FORMAT = 1
CACHE_ENV = "EMIM_TRITON_CACHE"
SHIPPED_DEFAULTS = "tuned_configs.json"  # in the emim_triton.tuned package

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class TuningCacheWarning(UserWarning):
    """A tuning-cache file was unreadable or stale and is being ignored."""


@dataclass(frozen=True)
class DeviceId:
    """Which GPU model a tuning result belongs to: its name and compute capability."""

    name: str
    capability: tuple[int, int]

    @property
    def slug(self) -> str:
        """File-name form: "NVIDIA H200", (9, 0) -> "nvidia-h200-sm90"."""
        words = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        return f"{words}-sm{self.capability[0]}{self.capability[1]}"

    @classmethod
    def of_cuda_device(cls, index: int | None = None) -> "DeviceId":
        index = torch.cuda.current_device() if index is None else index
        return cls(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


def shape_bucket(shape: EMIMShape) -> str:
    """The part of a cache key that depends on sizes other than K and D.

    The frame sides decide which tiles fit, the number of (batch, frame pair, head) slices decides how
    many programs fill the GPU; each is rounded up to a power of two, so nearby shapes (another batch
    size of the same model, a 13x13 instead of a 14x14 map) share one tuning.
    """
    slices = shape.batch * shape.pairs * shape.heads
    return f"h{next_power_of_2(shape.height)}w{next_power_of_2(shape.width)}s{next_power_of_2(slices)}"


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"no tuning for dtype {dtype}; the fused kernels take {list(_DTYPE_NAMES.values())}")
    return _DTYPE_NAMES[dtype]


def entry_key(shape: EMIMShape, dtype: torch.dtype) -> str:
    """The key of a shape's entry within a device's file, e.g. "bf16/K7/D64/h16w16s4096"."""
    return f"{dtype_name(dtype)}/K{shape.window}/D{shape.head_dim}/{shape_bucket(shape)}"


def configs_to_json(configs: EMIMConfigs) -> dict:
    return {**{kernel: getattr(configs, kernel).as_dict() for kernel in KERNELS},
            "strategies": {"forward": configs.forward_strategy, "backward": configs.backward_strategy}}


def configs_from_json(entry: dict) -> EMIMConfigs:
    """Rebuild configurations from an entry; ValueError if it is not a well-formed one."""
    try:
        built = {}
        for kernel in KERNELS:
            fields = entry[kernel]
            cls = RowConfig if kernel == "backward_weights" else TileConfig
            if not isinstance(fields, dict) or not all(isinstance(v, int) and v > 0 for v in fields.values()):
                raise ValueError(f"{kernel}: expected positive integer fields, got {fields!r}")
            built[kernel] = cls(**fields)
        # Entries written before the strategies were recorded (the shipped ones among them) run the offset loop.
        strategies = entry.get("strategies", {})
        if not isinstance(strategies, dict) or set(strategies) - {"forward", "backward"}:
            raise ValueError(f"strategies: expected {{'forward': ..., 'backward': ...}}, got {strategies!r}")
        return EMIMConfigs(**built, **{f"{kind}_strategy": value for kind, value in strategies.items()})
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed entry ({type(e).__name__}: {e})") from e


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "emim_triton"


class TuningCache:
    """The tuning results of one GPU model under one Triton version and one kernel version.

    Loaded lazily at the first `get`/`put`; thread-safe within a process. `put` merges with what is on
    disk at that moment (another process may have tuned other shapes meanwhile) and writes atomically.
    Two processes tuning the same key at once: the last writer wins, the file is never torn.
    """

    def __init__(self, device: DeviceId, triton_version: str, kernel_version: str,
                 directory: str | os.PathLike | None = None):
        self.device = device
        self.triton_version = triton_version
        self.kernel_version = kernel_version
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self._entries: dict[str, dict] | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.directory / f"{self.device.slug}.json"

    def _header(self) -> dict:
        return {"format": FORMAT, "device": self.device.name, "capability": list(self.device.capability),
                "triton": self.triton_version, "kernel_version": self.kernel_version}

    def get(self, key: str) -> EMIMConfigs | None:
        """The configurations stored under `key`, or None."""
        with self._lock:
            entry = self._loaded().get(key)
        return None if entry is None else configs_from_json(entry)

    def info(self, key: str) -> dict | None:
        """What was recorded with an entry (shape tuned at, times), or None."""
        with self._lock:
            entry = self._loaded().get(key)
        return None if entry is None else dict(entry.get("info", {}))

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded())

    def put(self, key: str, configs: EMIMConfigs, info: dict | None = None) -> None:
        """Store `configs` under `key` and write the file (atomically)."""
        entry = {**configs_to_json(configs), "info": dict(info or {})}
        with self._lock:
            self._loaded()[key] = entry
            on_disk = self._read(warn=False)  # entries other processes wrote since we loaded
            merged = {**on_disk, **self._entries}
            self._entries = merged
            write_json_atomically(self.path, {**self._header(), "entries": merged})

    def _loaded(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = self._read(warn=True)
        return self._entries

    def _read(self, warn: bool) -> dict[str, dict]:
        """The file's entries; {} if it is absent, and {} with one warning if corrupt or stale."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a format-{FORMAT} tuning cache")
            entries = data.get("entries")
            if not isinstance(entries, dict):
                raise ValueError("no 'entries' object")
            for key, entry in entries.items():
                configs_from_json(entry)  # validate every entry now, not at some later lookup
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            if warn:
                warnings.warn(f"emim_triton: ignoring the tuning cache {self.path}: it is unreadable ({e}); "
                              f"it will be rewritten at the next tuning", TuningCacheWarning, stacklevel=2)
            return {}
        made_for = {k: data.get(k) for k in ("device", "capability", "triton", "kernel_version")}
        wanted = {k: v for k, v in self._header().items() if k != "format"}
        if made_for != wanted:
            if warn:
                stale = ", ".join(f"{k} {made_for[k]!r} (now {wanted[k]!r})" for k in wanted
                                  if made_for[k] != wanted[k])
                warnings.warn(f"emim_triton: ignoring the stale tuning cache {self.path}: it was made for "
                              f"{stale}; it will be rewritten at the next tuning", TuningCacheWarning,
                              stacklevel=2)
            return {}
        return entries


def write_json_atomically(path: Path, data: dict) -> None:
    """Write `data` as JSON to `path` so that readers see the old file or the new one, never a mix."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()), prefix=f".{Path(path).name}.")


# --- Shipped defaults ------------------------------------------------------------------------------------


def read_shipped_defaults(text: str | None = None) -> dict[str, dict[str, dict]]:
    """{device slug: {entry key: entry}} from the package's data file (or `text`); {} if none.

    Shipped entries are measured configurations, not timings, so they are used whatever the Triton or
    kernel version (any valid configuration computes the same result; they may just no longer be the
    fastest). Malformed entries are dropped with one warning.
    """
    if text is None:
        try:
            text = resources.files("emim_triton.tuned").joinpath(SHIPPED_DEFAULTS).read_text()
        except (FileNotFoundError, ModuleNotFoundError):
            return {}
    try:
        data = json.loads(text)
        devices = data.get("devices", {}) if isinstance(data, dict) else None
        if not isinstance(devices, dict):
            raise ValueError("no 'devices' object")
    except ValueError as e:
        warnings.warn(f"emim_triton: ignoring the shipped tuning defaults: {e}", TuningCacheWarning)
        return {}
    usable, dropped = {}, []
    for slug, device in devices.items():
        entries = device.get("entries", {}) if isinstance(device, dict) else {}
        for key, entry in entries.items() if isinstance(entries, dict) else ():
            try:
                configs_from_json(entry)
                usable.setdefault(slug, {})[key] = entry
            except ValueError:
                dropped.append(f"{slug}:{key}")
    if dropped:
        warnings.warn(f"emim_triton: ignoring malformed shipped tuning defaults {dropped}", TuningCacheWarning)
    return usable


def add_to_shipped_defaults(path: Path, device: DeviceId, entries: dict[str, dict], triton_version: str,
                            kernel_version: str) -> None:
    """Merge `entries` for `device` into the shipped-defaults file at `path` (for the maintainers)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("format", FORMAT)
    devices = data.setdefault("devices", {})
    record = devices.setdefault(device.slug, {})
    record.update(device=device.name, capability=list(device.capability), triton=triton_version,
                  kernel_version=kernel_version)
    record.setdefault("entries", {}).update(entries)
    write_json_atomically(path, data)
