"""sae.train under jax.distributed: 2 local CPU processes (4 devices each, gloo collectives)
give the same SAE as one process with 8 devices on the same batches — data-parallel with a
checkpoint written once and resumed by both processes, and a sweep sharded across the
processes; and a ``jaxsense.sweep`` sharded over both processes' devices. Not bit-identical: the gradient all-reduce across processes (gloo) adds in
another order than XLA's in-process reduction; measured after 40 steps: 24 of 1024 W_dec
entries differ, by at most 6e-8 (one float32 ulp); the input scale is identical."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import sae

D_IN, WIDTH, B = 16, 64, 128


def data():
    D = sae.planted_dictionary(jax.random.key(0), D_IN, 48)
    return np.asarray(sae.PlantedSource(D, 4, 2048, seed=0).batch(0))


def config():
    return sae.TrainConfig(d_in=D_IN, width=WIDTH, batch_size=B, total_steps=40, lr=3e-3,
                           lam=1e-2, eps=0.05, theta_init=0.05, lam_warmup_steps=10,
                           steps_per_call=10, checkpoint_every=10, log_every=10,
                           progress=False, scale_batches=2)


SUBGM_KW = dict(d=8, r=2, m=120, spectrum=(2.0, 1.0), num_steps=200, record_every=50)


def subgm_grid():
    return {"p": [0.0, 0.1, 0.2, 0.3], "seed": [0, 1]}


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    port = _free_port()
    worker = os.path.join(os.path.dirname(__file__), "_dist_worker.py")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    got = np.load(tmp_path / "dist.npz")
    assert int(got["dp_steps"]) == 20  # the first call stopped at 20, the second resumed

    X, cfg = data(), config()
    one = sae.train(X, cfg, mesh=sae.make_mesh(n_data=8))  # this process: 8 CPU devices
    assert float(got["dp_scale"]) == one.scale
    for k, v in one.params.items():
        np.testing.assert_allclose(got[f"dp_{k}"], v, rtol=1e-6, atol=1e-7, err_msg=k)
    sw = sae.train(X, cfg, sweep=sae.sweep(cfg, lam=[1e-3, 1e-2]),
                   mesh=sae.make_mesh(n_data=4, n_sweep=2))
    for k, v in sw.params.items():
        np.testing.assert_allclose(got[f"sw_{k}"], v, rtol=1e-6, atol=1e-7, err_msg=k)

    import jaxsense

    js = jaxsense.sweep(subgm_grid(), **SUBGM_KW)
    np.testing.assert_allclose(got["js_final"], js.final["rel_fro_error"], rtol=1e-5)
    np.testing.assert_allclose(got["js_history"], js.history["rel_fro_error"], rtol=1e-5)
    assert js.final["rel_fro_error"].shape == (8,)
