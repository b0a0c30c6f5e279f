"""Compile-only targets: TPU slices and GPU nodes as devices on this host.

A target is a list of devices XLA can compile for without having them:
libtpu's topologies (`jax.experimental.topologies.get_topology_desc(
platform="tpu", topology_name="v5p:4x4x4")`) and the CUDA plugin with a
GPU target description (`platform="cuda"`, a `GpuTargetConfigProto`
text, `topology="1xNODESxGPUS"`). A Mesh over them lowers and compiles
like one over real chips; nothing can run.

Names (`--topology`):
  v5p:2x2x1, v5p:4x4x4, v5e:16x16, v6e:8x8, v4:2x2x4 ...   TPU slices
  v5p-64, v6e-64, v5litepod-256, v4-32   the same, as Cloud TPU names them
  h100x8, h200x8, a100x8          one node of 8 GPUs
  h100x8x4                        4 nodes of 8 (NVLink inside, network across)

The chip numbers below (HBM, peak bf16 FLOP/s, HBM and interconnect
bandwidth) are the vendors' published figures; they feed the step-time
estimates and the memory margin, never the compile itself (the compiler
has its own device description and decides what fits).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
from typing import Any

GiB = 2**30

# Where `pip install --target` puts the CUDA compiler plugin when it is kept
# out of the training environment (README, "Before you launch").
CUDA_PLUGIN_DIR = os.environ.get(
    "EVE_JAX_CUDA_PLUGINS",
    os.path.join(os.path.expanduser("~"), ".cache", "eve_jax", "cuda12"),
)


def _jax_version() -> str:
  try:
    return importlib.metadata.version("jax")
  except importlib.metadata.PackageNotFoundError:
    return "0.12.0.1"


# The plugin must be the installed jax's own version.
CUDA_PLUGIN_INSTALL = (
    f"pip install --no-deps --target {CUDA_PLUGIN_DIR} "
    f"jax-cuda12-pjrt=={_jax_version()} "
    f"jax-cuda12-plugin=={_jax_version()}"
)
TPU_INSTALL = "pip install -e '.[compile]'  (libtpu, ~700 MB)"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator's published figures.

  Attributes:
    name: what reports call it.
    hbm_bytes: memory per device.
    peak_flops: dense bf16 FLOP/s per device.
    hbm_bw: HBM bytes/s per device.
    link_bw: bytes/s one device sends to its peers in a collective (TPU
      ICI; GPU NVLink, one direction).
    node_bw: bytes/s per device across nodes (GPU: the network; TPU: the
      same ICI inside a slice).
  """

  name: str
  hbm_bytes: float
  peak_flops: float
  hbm_bw: float
  link_bw: float
  node_bw: float


# TPU: Cloud TPU's system-architecture pages. HBM as the compiler reports
# it available (v5p: "95.74G").
TPU_CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12, 3.0e11, 3.0e11),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 8.19e11, 2.0e11, 2.0e11),
    "v5p": Chip("TPU v5p", 95.74 * GiB, 459e12, 2.765e12, 6.0e11, 6.0e11),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12, 4.48e11, 4.48e11),
}


@dataclasses.dataclass(frozen=True)
class GPU:
  """What a GPU target description needs, and its published figures."""

  chip: Chip
  device_name: str  # the CUDA device name XLA sees
  compute_capability: tuple[int, int]
  cores: int  # streaming multiprocessors
  memory_bytes: int  # as the driver reports it
  clock_ghz: float
  l2_bytes: int
  shared_per_core: int
  shared_optin: int


# NVIDIA's data sheets (SXM parts, dense bf16 tensor-core peak, NVLink 4 at
# 900 GB/s both ways = 450 GB/s each way; 400 Gb/s InfiniBand per GPU).
GPUS = {
    "h100": GPU(
        Chip("NVIDIA H100 80GB", 84942979072, 989e12, 3.35e12, 4.5e11, 5.0e10),
        "NVIDIA H100 80GB HBM3",
        (9, 0),
        132,
        84942979072,
        1.98,
        50 * 2**20,
        233472,
        232448,
    ),
    "h200": GPU(
        Chip("NVIDIA H200 141GB", 151397597184, 989e12, 4.8e12, 4.5e11, 5.0e10),
        "NVIDIA H200 141GB HBM3e",
        (9, 0),
        132,
        151397597184,
        1.98,
        50 * 2**20,
        233472,
        232448,
    ),
    "a100": GPU(
        Chip("NVIDIA A100 80GB", 85899345920, 312e12, 2.039e12, 3.0e11, 2.5e10),
        "NVIDIA A100-SXM4-80GB",
        (8, 0),
        108,
        85899345920,
        1.41,
        40 * 2**20,
        167936,
        166912,
    ),
}


def gpu_target_config(gpu: GPU) -> str:
  """A `stream_executor.GpuTargetConfigProto` in text format: what XLA:GPU
  compiles against in place of a real device."""
  major, minor = gpu.compute_capability
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_per_core}
  threads_per_core_limit: 2048
  core_count: {gpu.cores}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(gpu.chip.hbm_bw)}
  l2_cache_size: {gpu.l2_bytes}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory_bytes}
  shared_memory_per_block_optin: {gpu.shared_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  name: "{gpu.device_name}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{gpu.device_name}"
"""


@dataclasses.dataclass
class Target:
  """Compile-only devices and what is known of them.

  Attributes:
    name: as given (`v5p:4x4x4`, `h100x8x4`).
    platform: "tpu" or "gpu" (what `sharding.target_platform` reports).
    devices: the devices, in the order meshes are built over.
    chip: the device's published figures.
    hosts: processes that would drive them (TPU VM workers, GPU nodes).
  """

  name: str
  platform: str
  devices: list[Any]
  chip: Chip
  hosts: int

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def describe(self) -> str:
    return (
        f"{self.name}: {self.num_devices} x {self.chip.name} "
        f"({self.hosts} host{'s' * (self.hosts > 1)})"
    )


class TargetError(ValueError):
  """A target that cannot be made here (one line: what to install or how
  to spell it)."""


_GPU_NAME = re.compile(r"^([a-z]\d+)x(\d+)(?:x(\d+))?$")
_ACCELERATOR = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")


def accelerator_topology(name: str) -> str:
  """A Cloud TPU accelerator type -> its topology name: v5p-64 (64
  TensorCores, 32 chips) -> v5p:2x4x4; v6e-64 (64 chips) -> v6e:8x8."""
  m = _ACCELERATOR.match(name)
  if not m:
    raise TargetError(
        f"{name!r} is not a Cloud TPU accelerator type like "
        "v5p-64, v6e-64, v5litepod-256, v4-32"
    )
  kind, n = m.group(1).replace("v5litepod", "v5e"), int(m.group(2))
  if kind in ("v4", "v5p"):  # 3-D torus; the type counts 2 cores a chip
    chips, dims = n // 2, [2, 2, 1]
  else:  # v5e, v6e: 2-D, one core a chip
    chips, dims = n, [1, 1]
  # Slices grow by doubling their smallest dimension, the last one first.
  while math.prod(dims) < chips:
    dims[min(range(len(dims)), key=lambda j: (dims[j], -j))] *= 2
  if math.prod(dims) != chips:
    raise TargetError(f"{name!r}: {chips} chips is not a slice size")
  return f"{kind}:" + "x".join(str(d) for d in dims)


_TPU_NAME = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+)+)$")


def get_target(name: str, num_slices: int = 1) -> Target:
  """The compile-only devices of `name` (module docstring), `num_slices`
  TPU slices joined by the data-center network (multislice)."""
  name = name.strip().lower()
  if _ACCELERATOR.match(name):
    name = accelerator_topology(name)
  if m := _TPU_NAME.match(name):
    return _tpu(name, m.group(1), num_slices)
  if m := _GPU_NAME.match(name):
    if num_slices != 1:
      raise TargetError(
          "--num_slices is for TPU; GPU nodes are the third "
          "number: h100x8x4 is 4 nodes of 8"
      )
    return _gpu(name, m.group(1), int(m.group(2)), int(m.group(3) or 1))
  raise TargetError(
      f"--topology={name!r}: expected a TPU slice like "
      f"v5p:4x4x4 ({', '.join(sorted(TPU_CHIPS))}) or GPU "
      f"nodes like h100x8 / h100x8x4 "
      f"({', '.join(sorted(GPUS))})"
  )


def _tpu(name: str, kind: str, num_slices: int) -> Target:
  if kind not in TPU_CHIPS:
    raise TargetError(f"TPU {kind!r} is not one of {sorted(TPU_CHIPS)}")
  if importlib.util.find_spec("libtpu") is None:
    raise TargetError(f"compile-only TPU targets need libtpu: {TPU_INSTALL}")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=name, num_slices=num_slices
    )
  except Exception as e:  # pylint: disable=broad-except
    raise TargetError(
        f"libtpu cannot make topology {name!r}: " f"{_first_line(e)}"
    ) from None
  devices = list(topo.devices)
  return Target(
      name if num_slices == 1 else f"{name} x {num_slices} slices",
      "tpu",
      devices,
      TPU_CHIPS[kind],
      len({d.process_index for d in devices}),
  )


def cuda_plugin_available() -> bool:
  """Whether jax can load the CUDA compiler (installed, or in
  CUDA_PLUGIN_DIR, which `ensure_cuda_plugin_path` puts on sys.path)."""
  if os.path.isdir(os.path.join(CUDA_PLUGIN_DIR, "jax_plugins", "xla_cuda12")):
    return True
  try:  # find_spec imports the parent, absent without any jax plugin
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ImportError:
    return False


def is_gpu_name(name: str) -> bool:
  """Whether `name` names GPU nodes (h100x8 ...), not a TPU slice."""
  return _GPU_NAME.match(name.strip().lower()) is not None


def ensure_cuda_plugin_path() -> None:
  """Puts CUDA_PLUGIN_DIR on sys.path. Must run before jax is imported:
  jax discovers its plugins once."""
  if os.path.isdir(CUDA_PLUGIN_DIR) and CUDA_PLUGIN_DIR not in sys.path:
    sys.path.append(CUDA_PLUGIN_DIR)


def _gpu(name: str, kind: str, gpus: int, nodes: int) -> Target:
  if kind not in GPUS:
    raise TargetError(f"GPU {kind!r} is not one of {sorted(GPUS)}")
  if not cuda_plugin_available():
    raise TargetError(
        "compile-only GPU targets need the CUDA compiler "
        f"plugin: {CUDA_PLUGIN_INSTALL}"
    )
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    topo = topologies.get_topology_desc(
        platform="cuda",
        topology_name="",
        target_config=gpu_target_config(GPUS[kind]),
        topology=f"1x{nodes}x{gpus}",
    )
  except Exception as e:  # pylint: disable=broad-except
    raise TargetError(
        f"the CUDA plugin cannot make {name!r}: "
        f"{_first_line(e)} (is JAX_PLATFORMS=cpu set?)"
    ) from None
  return Target(name, "gpu", list(topo.devices), GPUS[kind].chip, nodes)


def _first_line(e: Exception) -> str:
  lines = [x.strip() for x in str(e).splitlines() if x.strip()]
  return lines[0][:300] if lines else type(e).__name__
