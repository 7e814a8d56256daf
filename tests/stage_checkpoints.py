"""Reading a trained stage's checkpoint in tests, independent of the model's shapes."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def params_item(stage_dir, step=None):
  """(step, the `params` item as numpy) of `stage_dir/checkpoints`, latest step by default."""
  mngr = ocp.CheckpointManager(os.path.join(stage_dir, 'checkpoints'),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  return step, jax.tree.map(np.asarray, restored['params'])
