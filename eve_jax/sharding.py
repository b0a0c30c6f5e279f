"""The device mesh, logical axis rules, and how arrays are laid out on them.

One mesh with the axes (data, fsdp, expert, tensor), size 1 when unused.
Model code names logical axes only: parameters carry names such as `embed`,
`mlp`, `heads`, `expert` (see `eve_jax.model.layers.param`), activations are
constrained with `constrain(x, ("act_batch", "act_seq", ...))`. The config's
`axis_rules` maps each logical name to mesh axes:

  --config.axis_rules.embed=fsdp           FSDP: shard parameters' width
  --config.axis_rules.act_batch=data,fsdp,expert
  --config.axis_rules.kv=                  (empty: replicated)

A logical name maps to a dimension only when the mesh axes' product divides
it (so a 41-word vocabulary stays replicated on tensor=2) and a mesh axis is
used once per array. The batch is split over every axis `act_batch` names;
an MoE layer's dispatched tokens move from `act_batch` to `act_expert` x
`act_group` and GSPMD inserts the all-to-all between the two layouts.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axes (comma separated, "" = replicated). Parameters:
# embed (model width), mlp (FFN hidden), heads, kv (head dim), vocab, expert,
# norm (LayerNorm and layer-scale vectors). Activations: act_*.
DEFAULT_RULES = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": "",
    "vocab": "tensor",
    "expert": "expert",
    "norm": "",
    "layers": "",  # the stacked axis of scanned blocks: kept whole
    "act_batch": "data,fsdp,expert",
    "act_seq": "",
    "act_embed": "",
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_expert": "expert",
    "act_group": "data,fsdp",
}

Rules = tuple[tuple[str, tuple[str, ...]], ...]


def mesh_config() -> ml_collections.ConfigDict:
  """`config.mesh`: data-parallel over every device unless told otherwise."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))


def rules_config() -> ml_collections.ConfigDict:
  """`config.axis_rules`: the logical -> mesh axis table above."""
  return ml_collections.ConfigDict(dict(DEFAULT_RULES))


def mesh_shape(
    mesh_cfg: Any, num_devices: int, what: str = ""
) -> dict[str, int]:
  """{axis: size} for MESH_AXES, the one -1 filled so the product is
  `num_devices`. Raises ValueError (one line) when that is impossible;
  `what` names the devices in it (e.g. "tpu v5p:2x2x2")."""
  cfg = dict(mesh_cfg)
  unknown = sorted(set(cfg) - set(MESH_AXES))
  if unknown:
    raise ValueError(
        f"config.mesh has unknown axes {unknown}; the axes are "
        f"{list(MESH_AXES)}"
    )
  sizes = {a: int(cfg.get(a, 1)) for a in MESH_AXES}
  desc = " x ".join(f"{a}={s}" for a, s in sizes.items())
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(
        f"config.mesh {desc}: sizes must be >= 1, with at most "
        "one -1 to fill the rest"
    )
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
          f"config.mesh {desc}: {num_devices} devices are not "
          f"divisible by the fixed axes' product {known}"
      )
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f"config.mesh {desc} needs {known} devices, but there "
        f"are {num_devices}" + (f" ({what})" if what else "")
    )
  return sizes


def make_mesh(
    mesh_cfg: Any, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """The run's mesh over `devices` (default: all devices of all processes).

  Axis types are Auto: GSPMD propagates shardings from the parameters,
  inputs and `constrain` calls, and places the MoE all-to-all itself.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices), devices[0].platform)
  return jax.make_mesh(
      tuple(sizes[a] for a in MESH_AXES),
      MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices,
  )


def parse_rules(rules_cfg: Any) -> Rules:
  """config.axis_rules ({name: "a,b" or ""}) -> ((name, ("a", "b")), ...)."""
  out = []
  for name, value in dict(rules_cfg).items():
    axes = tuple(a.strip() for a in str(value or "").split(",") if a.strip())
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(
          f"config.axis_rules.{name}={value!r}: {bad} are not "
          f"mesh axes {list(MESH_AXES)}"
      )
    out.append((name, axes))
  return tuple(out)


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    rules: Rules,
    mesh_shape_: dict[str, int],
) -> P:
  """PartitionSpec for an array of `shape` whose dims are named `names`.

  Each name takes its rule's mesh axes that are not used by an earlier dim,
  have size > 1, and whose product divides the dim; the rest of the array
  is replicated. Unknown names are replicated too.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = []
    for a in table.get(name, ()) if name else ():
      size = mesh_shape_.get(a, 1)
      if a in used or size == 1:
        continue
      if dim % (math.prod(mesh_shape_[b] for b in axes) * size) == 0:
        axes.append(a)
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(abstract: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """NamedShardings for a pytree of (abstract) arrays and nnx Variables.

  Variables with logical names in their `out_sharding` metadata (parameters
  and the optimizer moments that copy them) are laid out by the rules;
  every other array (step counter, schedule counts) is replicated.
  """
  shape = dict(mesh.shape)

  def one(x):
    if _is_var(x):
      if not hasattr(x.get_value(), "shape"):
        return x  # an optax.MaskedNode: state multi_transform leaves empty
      names = x.get_metadata().get("out_sharding") or ()
      spec = (
          logical_to_spec(names, x.get_value().shape, rules, shape)
          if names
          else P()
      )
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, abstract, is_leaf=_is_var)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """`abstract` (ShapeDtypeStructs) with each leaf's sharding attached, the
  form orbax restores into."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      shardings,
  )


# The platform ("cpu", "tpu", "gpu") of the mesh `use` made current: the
# devices the program is compiled for, which need not be the host's (a
# compile-only TPU topology on a CPU machine, eve_jax/aot/).
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "eve_jax_target_platform", default=None
)


@contextlib.contextmanager
def use(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
  """Makes `mesh` and `rules` the ones `constrain` resolves against while
  functions are traced (jit lowering happens inside this context).

  Only tracing and lowering belong inside: an eager op here runs on the
  mesh's devices, which fails for compile-only ones. Build constants and
  keys before entering.
  """
  token = _TARGET_PLATFORM.set(mesh.devices.flat[0].platform)
  try:
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      yield
  finally:
    _TARGET_PLATFORM.reset(token)


def target_platform() -> str:
  """The platform of the devices being compiled for: that of the mesh in
  `use(...)`, else the host's default backend. Every backend-dependent
  choice in model code asks this, never `jax.default_backend()`."""
  return _TARGET_PLATFORM.get() or jax.default_backend()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins activation `x`'s layout by logical names under the active mesh.

  A no-op outside `use(...)` or on a one-device mesh, so model code can call
  it unconditionally.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  rules = flax_spmd.get_logical_axis_rules()
  spec = logical_to_spec(names, x.shape, rules, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


def batch_spec(batch_size: int) -> P:
  """The PartitionSpec of a [B] axis split as `act_batch` says under the
  active mesh and rules (P(None) where its axes do not divide B, and
  outside `use(...)`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return P(None)
  rules = flax_spmd.get_logical_axis_rules()
  return logical_to_spec(("act_batch",), (batch_size,), rules, dict(mesh.shape))


def logical_size(name: str) -> int:
  """How many devices logical axis `name` is split over under the active
  mesh and rules (1 outside `use(...)`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return _axes_size(dict(mesh.shape), flax_spmd.get_logical_axis_rules(), name)


def _axes_size(mesh_shape_: dict[str, int], rules: Rules, name: str) -> int:
  """The product of the mesh axes that `rules` map logical `name` to."""
  return math.prod(mesh_shape_.get(a, 1) for a in dict(rules).get(name, ()))


def batch_sharding(
    mesh: jax.sharding.Mesh, rules: Rules, batch_size: int
) -> NamedSharding:
  """Layout of a [B, ...] input batch: B split as `act_batch` says."""
  spec = logical_to_spec(("act_batch",), (batch_size,), rules, dict(mesh.shape))
  return NamedSharding(mesh, spec)


def data_parallel_size(mesh: jax.sharding.Mesh, rules: Rules) -> int:
  """How many ways `act_batch` splits the batch (the product of its axes)."""
  return _axes_size(dict(mesh.shape), rules, "act_batch")


def check_batch(
    name: str, batch_size: int, mesh: jax.sharding.Mesh, rules: Rules
) -> None:
  """One-line error unless the batch splits evenly over the data shards."""
  n = data_parallel_size(mesh, rules)
  axes = " x ".join(a for a in dict(rules).get("act_batch", ()))
  if batch_size % n:
    raise ValueError(
        f"{name}={batch_size} is not divisible by the {n} "
        f"data-parallel shards ({axes} of the mesh)"
    )


def check_experts(
    num_experts: int,
    num_soft_layers: int,
    mesh: jax.sharding.Mesh,
    rules: Rules,
) -> None:
  """One-line error unless the experts split evenly over the expert axes."""
  axes = dict(rules).get("expert", ())
  n = _axes_size(dict(mesh.shape), rules, "expert")
  if num_soft_layers and num_experts % n:
    raise ValueError(
        f"model.num_experts={num_experts} is not divisible by "
        f"the expert-parallel size {n} "
        f"({' x '.join(axes)} of the mesh)"
    )


def process_batch_slice(
    sharding: NamedSharding, batch_size: int
) -> tuple[int, int]:
  """(index, count): this process feeds rows [index * B/count, ...) of the
  global batch. Processes whose devices hold the same rows (a batch
  replicated over `tensor` across hosts) get the same index."""
  rows = set()
  for idx in sharding.addressable_devices_indices_map((batch_size,)).values():
    start, stop, _ = idx[0].indices(batch_size)
    rows.update(range(start, stop))
  rows = sorted(rows)
  local = len(rows)
  if rows != list(range(rows[0], rows[0] + local)) or batch_size % local:
    raise ValueError(
        f"this process holds batch rows {rows[0]}..{rows[-1]} "
        "that are not one contiguous equal block; reorder the "
        "mesh axes"
    )
  return rows[0] // local, batch_size // local


def global_batch(
    local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int
) -> dict[str, jax.Array]:
  """This process's rows -> global arrays of `batch_size` rows on the mesh
  (`sharding` splits the first dim; the rest are replicated)."""
  return {
      k: jax.make_array_from_process_local_data(
          sharding, v, (batch_size,) + v.shape[1:]
      )
      for k, v in local.items()
  }
