"""sae.checkpoint through sae.train: no silent loss of checkpoints (resume=False on a used
folder), overwrite, structured (name-keyed) state, mismatch messages, sharded restore."""
import jax
import numpy as np
import pytest

import sae

D_IN, WIDTH, B = 16, 64, 128


def _data(n=1024, seed=0):
    D = sae.planted_dictionary(jax.random.key(seed), D_IN, 48)
    return np.asarray(sae.PlantedSource(D, 4, n, seed=seed).batch(0))


def _cfg(**kw):
    base = dict(d_in=D_IN, width=WIDTH, batch_size=B, total_steps=20, lr=3e-3, lam=1e-2,
                eps=0.05, theta_init=0.05, steps_per_call=5, checkpoint_every=10,
                progress=False, scale_batches=2, log_every=10)
    base.update(kw)
    return sae.TrainConfig(**base)


def _latest_state(ck, template):
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(ck)
    step = mngr.latest_step()
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(sae.checkpoint.abstract_like(template))))
    return step, out["state"]


def test_resume_false_on_used_folder_raises_then_overwrite_replaces(tmp_path):
    X = _data()
    ck = str(tmp_path / "ck")
    sae.train(X, _cfg(total_steps=20), checkpoint_dir=ck)
    with pytest.raises(FileExistsError, match=r"ck.*resume=False"):
        sae.train(X, _cfg(total_steps=10, seed=1), checkpoint_dir=ck, resume=False)
    # the old run is untouched by the refused call
    new = sae.train(X, _cfg(total_steps=10, seed=1), checkpoint_dir=ck, resume=False,
                    overwrite=True)
    step, state = _latest_state(ck, new.state)
    assert step == 10  # the old run's steps (up to 20) are gone, the new final step is saved
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_false_on_empty_or_missing_folder_trains(tmp_path):
    ck = tmp_path / "empty"
    ck.mkdir()
    res = sae.train(_data(), _cfg(total_steps=10), checkpoint_dir=str(ck), resume=False)
    assert _latest_state(str(ck), res.state)[0] == 10


def test_checkpoint_is_keyed_by_name_and_mismatch_names_the_field(tmp_path):
    X = _data()
    ck = str(tmp_path / "ck")
    res = sae.train(X, _cfg(), checkpoint_dir=ck)
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(f"{ck}/20/state")
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert {"['params']['W_dec']['value']", "['params']['theta']['value']", "['step']",
            "['since_fired']"} <= names
    # Adam's ν keyed by parameter name (its index in the chain depends on decoder_norm)
    assert any(n.startswith("['opt_state']") and n.endswith("['nu']['W_enc']['value']")
               for n in names)
    names = {n.split("'")[3] for n in names if n.startswith("['params']")}
    assert names == {"W_dec", "W_enc", "theta", "b_enc", "b_dec"}
    assert int(res.state.step) == 20
    with pytest.raises(sae.checkpoint.CheckpointMismatchError,
                       match=r"config\.width: checkpoint 64, this run 32"):
        sae.train(X, _cfg(width=32, total_steps=30), checkpoint_dir=ck)


def test_sharded_sweep_state_restores_sharded_and_exact(tmp_path):
    X = _data()
    cfg = _cfg(total_steps=20)
    sw = sae.sweep(cfg, lam=[1e-3, 1e-2])
    mesh = sae.make_mesh(n_data=4, n_sweep=2)
    full = sae.train(X, cfg, sweep=sw, mesh=mesh)
    ck = str(tmp_path / "ck")
    sae.train(X, cfg, sweep=sw, mesh=mesh, checkpoint_dir=ck, max_steps=10)
    res = sae.train(X, cfg, sweep=sw, mesh=mesh, checkpoint_dir=ck)
    assert res.state.params["W_dec"][...].sharding.spec[0] == "sweep"
    for k in full.params:
        np.testing.assert_array_equal(full.params[k], res.params[k], err_msg=k)
