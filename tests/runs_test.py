"""Tests of the run folder's JSON files, metric rows and where a trained genotype came from."""

import json
import os

import pytest

from pcp_jax import genotypes
from pcp_jax import runs


def test_write_json_replaces_the_file_whole(tmp_path):
  path = str(tmp_path / runs.RESULTS)
  runs.write_json(path, {'b': 1, 'a': [1, 2]}, sort_keys=True)
  runs.write_json(path, {'test_accuracy': 0.97})
  assert runs.load_json(path) == {'test_accuracy': 0.97}
  assert os.listdir(tmp_path) == [runs.RESULTS]  # no temporary file left behind


def test_load_json_of_a_missing_file_is_empty_and_of_a_bad_one_names_it(tmp_path):
  assert runs.load_json(str(tmp_path / 'absent.json')) == {}
  path = tmp_path / runs.SEARCH_SUMMARY
  path.write_text('{"method": ')
  with pytest.raises(ValueError, match='not valid JSON') as error:
    runs.load_json(str(path))
  assert str(path) in str(error.value)


def test_rows_resume_drops_the_rows_after_the_checkpoint(tmp_path):
  rows = runs.Rows(str(tmp_path / runs.TRAIN_METRICS))
  for step in (10, 20, 30):
    rows.append({'step': step, 'valid_acc': step / 100})
  rows.keep_until(20)
  assert [r['step'] for r in rows.read()] == [10, 20]
  reader = runs.Rows(rows.path, write=False)
  reader.append({'step': 40})
  reader.keep_until(10)
  assert [r['step'] for r in rows.read()] == [10, 20]  # only the writing process writes


def test_rows_cut_short_at_the_end_are_dropped_elsewhere_named(tmp_path):
  path = tmp_path / runs.SEARCH_METRICS
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "tr')
  assert runs.Rows(str(path)).read() == [{'step': 1}, {'step': 2}]
  path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
  with pytest.raises(ValueError, match='line 2 is not valid JSON'):
    runs.Rows(str(path)).read()
  for bad in ('{}', '[1, 2]', '{"step": "3"}', '{"step": true}'):  # a row holds its step
    path.write_text('{"step": 1}\n' + bad + '\n')
    with pytest.raises(ValueError, match='line 2 is not a row .* repair or delete that line'):
      runs.Rows(str(path)).keep_until(5)


def write_search(folder, method='SS PCP-DARTS'):
  folder.mkdir()
  (folder / runs.SEARCH_SUMMARY).write_text(json.dumps({'method': method,
                                                        'search_cost_days': 0.2}))
  genotypes.save(genotypes.REFERENCE_GENOTYPES['PDARTS'], str(folder / runs.GENOTYPE))
  return folder


def test_a_trained_genotype_is_named_after_its_search(tmp_path):
  search = write_search(tmp_path / 'search_ssf05')
  genotype_path = str(search / runs.GENOTYPE)
  assert runs.method_name(genotype_path) == runs.method_name(str(search)) == 'SS PCP-DARTS'
  assert runs.method_name(genotype_path, 'mine') == 'mine'
  assert runs.method_name('PDARTS') == 'P-DARTS cell'
  assert set(genotypes.REFERENCE_METHODS) == set(genotypes.REFERENCE_GENOTYPES)
  assert runs.search_summary(genotype_path)['search_cost_days'] == 0.2
  assert runs.search_summary('PDARTS') == {}
  # Without a search summary: the folder's name, or the file's.
  plain = tmp_path / 'hand_written'
  plain.mkdir()
  genotypes.save(genotypes.REFERENCE_GENOTYPES['PDARTS'], str(plain / runs.GENOTYPE))
  genotypes.save(genotypes.REFERENCE_GENOTYPES['PDARTS'], str(plain / 'cell_a.json'))
  assert runs.method_name(str(plain / runs.GENOTYPE)) == 'hand_written'
  assert runs.method_name(str(plain / 'cell_a.json')) == 'cell_a'


def test_search_folder_from_a_relative_source(tmp_path):
  search = write_search(tmp_path / 'search')
  trained = tmp_path / 'trained'
  trained.mkdir()
  assert runs.search_folder(str(trained), os.path.join('search', runs.GENOTYPE)) == str(search)
  assert runs.search_folder(str(trained), 'PDARTS') == ''
  assert runs.search_folder(str(search), None) == str(search)  # a search folder is its own


def test_set_aside_moves_an_earlier_runs_outputs_into_numbered_folders(tmp_path):
  assert runs.set_aside(str(tmp_path), runs.TRAIN_OUTPUTS) is None  # nothing there
  for round_ in (1, 2):
    (tmp_path / runs.RESULTS).write_text(f'{{"round": {round_}}}')
    (tmp_path / 'fgsm_accuracy.png').write_bytes(b'png')
    (tmp_path / runs.BEST / '4').mkdir(parents=True)
    (tmp_path / runs.CONFIG).write_text('{}')  # rewritten by every session: stays
    folder = runs.set_aside(str(tmp_path), runs.TRAIN_OUTPUTS)
    assert folder == str(tmp_path / runs.EARLIER / str(round_))
    assert sorted(os.listdir(folder)) == sorted([runs.BEST, runs.RESULTS, 'fgsm_accuracy.png'])
    assert runs.load_json(os.path.join(folder, runs.RESULTS)) == {'round': round_}
    assert sorted(os.listdir(tmp_path)) == [runs.CONFIG, runs.EARLIER]
