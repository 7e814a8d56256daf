"""mapkd_jax.data_bench (input-pipeline samples/s) and config_lib.load_config_file, its loader."""
import json
import os

import pytest

from mapkd_jax import data_bench
from mapkd_jax.train import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCS = os.path.join(ROOT, 'configs', 'tcs.py')


def test_throughput_line_on_random_shards(capsys, monkeypatch):
  monkeypatch.chdir(ROOT)   # random shards come from tests/shard_fixtures.py
  result = data_bench.main(['--config', f'{TCS}:student,tiny', '--samples', '12',
                            '--num_shards', '2', '--batch_size', '4', '--warmup', '1',
                            '--batches', '2', '--points', '64'])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
  assert [line['event'] for line in lines] == ['random_shards', 'throughput']
  assert lines[1] == result and result['batches'] == 2 and result['batch_size'] == 4
  assert result['samples_per_s'] > 0 and result['image_size'] == [64, 176]


def test_load_config_file_validates_and_names_the_problem(tmp_path):
  config = config_lib.load_config_file(f'{TCS}:student,tiny')
  assert config.stage == 'student' and tuple(config.data.image_size) == (64, 176)
  with pytest.raises(ValueError, match=r"--config 'nowhere.py:student': no config file 'nowhere.py'"):
    config_lib.load_config_file('nowhere.py:student')
  empty = tmp_path / 'empty.py'
  empty.write_text('X = 1\n')
  with pytest.raises(ValueError, match='defines no get_config'):
    config_lib.load_config_file(f'{empty}:student', flag='--cfg')
  with pytest.raises(ValueError, match='stage'):
    config_lib.load_config_file(f'{TCS}:nostage')
