"""parallel: ahead-of-time compilation of a loop's step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pcp_jax import parallel


def test_compiled_on_first_call_computes_the_jitted_function_and_compiles_once():
  traces = []

  def step(x, scale):
    traces.append(1)
    return x * scale + 1

  jitted = jax.jit(step, donate_argnums=(0,))
  fn = parallel.CompiledOnFirstCall(jitted)
  x = jnp.arange(4.0)
  y = fn(x, jnp.float32(2))
  z = fn(y, jnp.float32(3))
  np.testing.assert_allclose(z, (np.arange(4.0) * 2 + 1) * 3 + 1)
  assert len(traces) == 1
  # `lower` is the jitted function's (what the benchmark compiles and times).
  assert 'multiply' in fn.lower(z, jnp.float32(2)).as_text()


def test_compile_ahead_compiles_with_options_xla_accepts():
  # An option XLA does not know, or an unknown scheduler name, fails the compilation.
  compiled = parallel.compile_ahead(jax.jit(lambda x: x + 1), jnp.zeros(3))
  np.testing.assert_array_equal(compiled(jnp.ones(3)), 2 * np.ones(3))


def test_a_build_with_the_same_arguments_is_reused_but_not_another_config_or_shape():
  built = []

  @parallel.reused
  def build(config, switches, shape):
    built.append((config.seed, shape))
    return object()

  config = ml_collections.ConfigDict({'seed': 0, 'search': {'channels': 4}})
  switches = {'normal': np.ones((14, 4), bool)}
  first = build(config, switches, (8, 8, 3))
  other_seed = ml_collections.ConfigDict({'seed': 5, 'search': {'channels': 4},
                                          'checkpoint': {'every_steps': 3}})
  assert build(other_seed, {'normal': np.ones((14, 4), bool)}, (8, 8, 3)) is first
  assert build(config, switches, (16, 16, 3)) is not first
  wider = ml_collections.ConfigDict({'seed': 0, 'search': {'channels': 8}})
  assert build(wider, switches, (8, 8, 3)) is not first
  fewer_ops = {'normal': np.eye(14, 4, dtype=bool)}
  assert build(config, fewer_ops, (8, 8, 3)) is not first
  unhashable = bytearray(2)  # built afresh each time
  assert build(config, unhashable, (8, 8, 3)) is not build(config, unhashable, (8, 8, 3))
  assert len(built) == 6
  for n in range(parallel.REUSED_BUILDS):  # the oldest are dropped
    build(config, switches, (n, 1, 3))
  assert build(config, switches, (8, 8, 3)) is not first
  parallel.forget_builds()
  assert build(config, switches, (16, 16, 3)) is not None and len(built) == 8 + 6 + 2
