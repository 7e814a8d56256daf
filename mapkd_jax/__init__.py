"""mapkd-jax: MapKD Teacher-Coach-Student distillation for online HD map construction."""
