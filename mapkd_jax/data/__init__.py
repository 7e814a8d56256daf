"""Input data: shard schema and the tf.data pipeline."""
