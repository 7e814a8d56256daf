"""The training system, one concern a module (launch.py and the demo drive it).

  config_lib.py    config files: `:arg` parsing, loading `path:arg`, validation
  sharding.py      the one `data` mesh and the shardings of state and batches (jit + NamedSharding)
  checkpoint.py    Orbax checkpoint managers and items (params, opt_state, data position, meta)
  stages.py        the Teacher-Coach-Student chain: stage dirs, dependencies, data, init, frozen
  step.py          TrainState, optimizer, the jitted train and eval steps and their losses
  trainer.py       one stage's loop: data, init / resume, steps, logs, evals, checkpoints
  frozen_cache.py  the frozen teacher's / coach's outputs per sample (CLI: mapkd_jax/cache_frozen.py)
"""
