"""Losses: task (all stages), distillation (MSRD, TGPD) and the HD-prior MAE loss."""
from mapkd_jax.losses.distill import extract_patches
from mapkd_jax.losses.distill import msrd_loss
from mapkd_jax.losses.distill import patch_tokens
from mapkd_jax.losses.distill import TGPDProjector
from mapkd_jax.losses.distill import tgpd_loss
from mapkd_jax.losses.distill import tgpd_terms
from mapkd_jax.losses.distill import token_attention_logits
from mapkd_jax.losses.mae import mae_loss
from mapkd_jax.losses.task import bce_with_logits
from mapkd_jax.losses.task import direction_loss
from mapkd_jax.losses.task import direction_targets
from mapkd_jax.losses.task import discriminative_loss
from mapkd_jax.losses.task import masked_mean
from mapkd_jax.losses.task import semantic_loss
from mapkd_jax.losses.task import task_loss
