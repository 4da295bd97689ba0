"""parallel: ahead-of-time compilation of a loop's step."""

import jax
import jax.numpy as jnp
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
