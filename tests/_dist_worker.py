"""One process of the 2-process ``jax.distributed`` test (tests/test_distributed.py).

    python tests/_dist_worker.py PROCESS_ID PORT OUT_DIR

4 CPU devices per process, gloo CPU collectives, coordinator on localhost. Trains (a) a
data-parallel SAE over an 8-device ('data') mesh spanning both processes, interrupted
after 20 steps and resumed from the orbax checkpoint, and (b) a 2-SAE sweep whose 'sweep'
axis spans the processes, and (c) a ``jaxsense.sweep`` over 8 SubGM instances sharded over
both processes' devices. Process 0 writes the exported parameters to OUT_DIR/dist.npz.
"""
import os
import sys

pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import test_distributed as T  # noqa: E402

import sae  # noqa: E402

assert jax.process_count() == 2 and len(jax.devices()) == 8
X = T.data()
cfg = T.config()
ck = os.path.join(out, "ck")
part = sae.train(X, cfg, mesh=sae.make_mesh(n_data=8), checkpoint_dir=ck, max_steps=20)
resumed = sae.train(X, cfg, mesh=sae.make_mesh(n_data=8), checkpoint_dir=ck)
sw = sae.train(X, cfg, sweep=sae.sweep(cfg, lam=[1e-3, 1e-2]),
               mesh=sae.make_mesh(n_data=4, n_sweep=2))
import jaxsense  # noqa: E402

grid = T.subgm_grid()
js = jaxsense.sweep(grid, **T.SUBGM_KW)
if pid == 0:
    np.savez(os.path.join(out, "dist.npz"), js_final=js.final["rel_fro_error"],
             js_history=js.history["rel_fro_error"],
             **{f"dp_{k}": v for k, v in resumed.params.items()},
             **{f"sw_{k}": v for k, v in sw.params.items()},
             dp_scale=resumed.scale, dp_steps=int(part.history[-1]["step"]))
print(f"process {pid} done", flush=True)
