"""Genotype data, JSON round trip, op dropping and derivation on hand-made weights."""

import json

import numpy as np
import pytest

from pcp_jax import genotypes as G

NONE, MAX, AVG, SKIP, SEP3, SEP5, DIL3, DIL5 = range(8)


def logits_for(probs_rows):
  """Alphas whose softmax is (proportional to) the given rows."""
  return np.log(np.asarray(probs_rows, dtype=np.float64))


def uniform_arch(num_ops=8, betas=True):
  arch = {'alphas_normal': np.zeros((14, num_ops)), 'alphas_reduce': np.zeros((14, num_ops))}
  if betas:
    arch['betas_normal'] = np.zeros(14)
    arch['betas_reduce'] = np.zeros(14)
  return arch


def test_reference_genotypes_are_valid_and_round_trip(tmp_path):
  for name, genotype in G.REFERENCE_GENOTYPES.items():
    G.validate(genotype)
    path = tmp_path / f'{name}.json'
    G.save(genotype, str(path))
    assert G.load(str(path)) == genotype
    assert G.get(str(path)) == genotype
  assert G.get('PDARTS') is G.REFERENCE_GENOTYPES['PDARTS']
  d = G.to_dict(G.REFERENCE_GENOTYPES['DARTS_V2'])
  assert d['normal'][0] == ['sep_conv_3x3', 0] and d['normal_concat'] == [2, 3, 4, 5]


def test_bad_genotypes_give_clear_errors(tmp_path):
  d = G.to_dict(G.REFERENCE_GENOTYPES['DARTS_V2'])
  d['normal'][3] = ['conv_7x7', 1]
  with pytest.raises(ValueError, match='unknown op'):
    G.from_dict(d)
  d = G.to_dict(G.REFERENCE_GENOTYPES['DARTS_V2'])
  d['reduce'][0] = ['max_pool_3x3', 4]  # node 0 only sees inputs 0 and 1
  with pytest.raises(ValueError, match='out of range'):
    G.from_dict(d)
  with pytest.raises(ValueError, match='neither a reference name'):
    G.get(str(tmp_path / 'missing.json'))


@pytest.mark.parametrize('cell, index, value, message', [
    ('normal', 3, ['sep_conv_3x3', 1.7], r'genotype.normal\[3\] input must be a whole number'),
    ('normal', 3, ['sep_conv_3x3'], r'genotype.normal must be a list of \[op, input\] pairs'),
    ('reduce_concat', None, [2, 2, 2, 2], r'reduce_concat must be distinct node indices'),
    ('normal_concat', None, [2, 3.5], r'genotype.normal_concat must be a whole number')])
def test_malformed_genotype_files_name_the_file_and_the_field(tmp_path, cell, index, value,
                                                              message):
  d = G.to_dict(G.REFERENCE_GENOTYPES['DARTS_V2'])
  if index is None:
    d[cell] = value
  else:
    d[cell][index] = value
  path = tmp_path / 'genotype.json'
  path.write_text(json.dumps(d))
  with pytest.raises(ValueError, match=f'{path}: .*{message}'):
    G.load(str(path))
  path.write_text('{"normal": [')
  with pytest.raises(ValueError, match=rf'{path} is not valid JSON'):
    G.load(str(path))


def test_strongest_edges_first_and_none_never_chosen():
  arch = uniform_arch(betas=False)
  rows = np.full((14, 8), 1.0)
  # Node 0 (edges 0, 1): `none` dominates edge 0, but is never chosen.
  rows[0, NONE] = 100.0
  rows[0, SEP5] = 3.0
  rows[1, DIL3] = 5.0
  # Node 1 (edges 2, 3, 4): input 2 strongest, then input 0.
  rows[2, MAX] = 4.0
  rows[4, SEP3] = 9.0
  arch['alphas_normal'] = logits_for(rows)
  genotype = G.derive_genotype(arch, use_betas=False)
  # Edge 1's dil_conv has probability 5/12; edge 0's sep_conv_5x5 3/110: edge 1 first.
  assert genotype.normal[0] == ('dil_conv_3x3', 1)
  assert genotype.normal[1] == ('sep_conv_5x5', 0)
  assert genotype.normal[2] == ('sep_conv_3x3', 2)
  assert genotype.normal[3] == ('max_pool_3x3', 0)
  assert all(op != 'none' for op, _ in genotype.normal + genotype.reduce)


def test_ties_go_to_the_lower_index():
  genotype = G.derive_genotype(uniform_arch(betas=False), use_betas=False)
  # All weights equal: every node keeps inputs 0 and 1 with the first non-none op.
  for k, (op, j) in enumerate(genotype.normal):
    assert op == 'max_pool_3x3'
    assert j == k % 2


def test_betas_change_which_edges_win():
  arch = uniform_arch()
  rows = np.full((14, 8), 1.0)
  rows[9, SEP3] = 3.0  # node 3 (edges 9..13): edge 9 (input 0) has the strongest op
  rows[10, DIL5] = 2.0
  arch['alphas_normal'] = logits_for(rows)
  without = G.derive_genotype(arch, use_betas=False)
  assert without.normal[6:] == (('sep_conv_3x3', 0), ('dil_conv_5x5', 1))
  # Edge normalisation strongly favouring inputs 3 and 4 of node 3 overrides the alphas.
  arch['betas_normal'][12] = 5.0
  arch['betas_normal'][13] = 4.0
  with_betas = G.derive_genotype(arch, use_betas=True)
  assert [j for _, j in with_betas.normal[6:]] == [3, 4]


def test_switches_map_columns_back_to_primitives():
  switches = np.zeros((14, 8), bool)
  switches[:, [NONE, SKIP, DIL5]] = True
  arch = {'alphas_normal': np.zeros((14, 3)), 'alphas_reduce': np.zeros((14, 3))}
  arch['alphas_normal'][:, 2] = 1.0  # third column = dil_conv_5x5
  arch['alphas_normal'][:, 0] = 5.0  # none, never chosen
  genotype = G.derive_genotype(arch, use_betas=False, switches_normal=switches,
                               switches_reduce=switches)
  assert {op for op, _ in genotype.normal} == {'dil_conv_5x5'}
  assert {op for op, _ in genotype.reduce} == {'skip_connect'}  # ties: lower index


def test_skip_connect_limit_removes_the_weakest_skips():
  arch = uniform_arch(betas=False)
  rows = np.full((14, 8), 1.0)
  strengths = {0: 9.0, 1: 8.0, 2: 7.0, 3: 6.5, 5: 6.0, 6: 5.5}  # skip on six strong edges
  for e, v in strengths.items():
    rows[e, SKIP] = v
  for e in range(14):
    rows[e, SEP3] = 2.0
  arch['alphas_normal'] = logits_for(rows)
  unlimited = G.derive_genotype(arch, use_betas=False)
  assert sum(op == 'skip_connect' for op, _ in unlimited.normal) == 6
  limited = G.derive_genotype(arch, use_betas=False, max_skip_normal=2)
  skips = [j for op, j in limited.normal if op == 'skip_connect']
  assert len(skips) == 2
  assert limited.normal[:2] == (('skip_connect', 0), ('skip_connect', 1))  # strongest kept
  assert all(op in ('skip_connect', 'sep_conv_3x3') for op, _ in limited.normal)


def test_drop_weakest_ops_keeps_the_strongest():
  switches = G.all_switches()
  rows = np.tile(np.arange(1, 9, dtype=float), (14, 1))  # dil_conv_5x5 strongest
  rows[:, NONE] = 50.0
  kept = G.drop_weakest_ops(logits_for(rows), switches, 3)
  assert kept.sum(axis=1).tolist() == [3] * 14
  assert kept[0].tolist() == [True, False, False, False, False, False, True, True, False]
  last = G.drop_weakest_ops(logits_for(rows), switches, 3, drop_none_first=True)
  assert not last[:, NONE].any() and last[:, DIL5].all()
  # Second round over the surviving columns only.
  again = G.drop_weakest_ops(np.log([[50.0, 7.0, 8.0]] * 14), kept, 1)
  assert again[0].tolist() == [True] + [False] * 8


def test_switch_checks():
  bad = G.all_switches()
  bad[3, 2] = False
  with pytest.raises(ValueError, match='same number'):
    G.check_switches(bad)
  with pytest.raises(ValueError, match='cannot keep'):
    G.drop_weakest_ops(np.zeros((14, 8)), G.all_switches(), 9)


def test_skip_limit_stops_when_skip_is_the_only_choice_left():
  switches = np.zeros((14, 8), bool)
  switches[:, [NONE, SKIP]] = True
  switches[9, SKIP] = False  # keep the per-edge op count equal: edge 9 has none + max_pool
  switches[9, MAX] = True
  arch = {'alphas_normal': np.zeros((14, 2)), 'alphas_reduce': np.zeros((14, 2))}
  arch['alphas_normal'][:, 1] = 1.0
  genotype = G.derive_genotype(arch, use_betas=False, switches_normal=switches,
                               switches_reduce=switches, max_skip_normal=2)
  # Skips are removed while another edge can stand in (the weakest, then the lowest index
  # first); every node still needs two edges, so seven skip-connects remain.
  assert genotype.normal == (('skip_connect', 0), ('skip_connect', 1),
                             ('skip_connect', 1), ('skip_connect', 2),
                             ('skip_connect', 2), ('skip_connect', 3),
                             ('max_pool_3x3', 0), ('skip_connect', 4))


def test_cell_topology_numbers_edges_node_by_node():
  # The order of the 14 rows of every alphas/betas array and of the op-weight panels.
  assert G.NUM_EDGES == len(G.EDGES) == 14
  for node, edges in enumerate(G.NODE_EDGES):
    assert G.EDGES[edges] == tuple((i, node) for i in range(node + 2))
  assert [G.state_name(i) for i in (0, 1, 2, 5)] == ['c_{k-2}', 'c_{k-1}', 'node 0', 'node 3']


# PC-DARTS' genotypes.py, pasted as its README tells users to (`range`, lists).
PC_DARTS_PASTED = (
    "Genotype(normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0), "
    "('dil_conv_3x3', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('avg_pool_3x3', 0), "
    "('dil_conv_3x3', 1)], normal_concat=range(2, 6), reduce=[('sep_conv_5x5', 1), "
    "('max_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_5x5', 2), ('sep_conv_3x3', 0), "
    "('sep_conv_3x3', 3), ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], reduce_concat=range(2, 6))")


def test_a_pasted_genotype_is_read_and_the_log_form_reads_back():
  assert G.get(PC_DARTS_PASTED) == G.REFERENCE_GENOTYPES['PC_DARTS_cifar']
  assert G.to_string(G.REFERENCE_GENOTYPES['PC_DARTS_cifar']) == PC_DARTS_PASTED
  for name, genotype in G.REFERENCE_GENOTYPES.items():
    assert G.get(G.to_string(genotype)) == genotype, name


@pytest.mark.parametrize('text, message', [
    ("Genotype(normal=__import__('os').system('true'))", 'must be a literal'),
    (PC_DARTS_PASTED.replace('range(2, 6)', "range('2', 6)", 1), 'must be a literal'),
    ('Genotype(normal=[', 'not valid Python syntax'),
    ("Genotypes(normal=[])", 'neither a reference name'),
    ("Genotype([], range(2, 6), [], range(2, 6))", 'keyword arguments'),
    (PC_DARTS_PASTED.replace("'avg_pool_3x3', 0", "'avg_pool_3x3', 7"), 'out of range'),
])
def test_a_bad_pasted_genotype_is_refused_naming_why(text, message):
  with pytest.raises(ValueError, match=message):
    G.get(text)


def test_the_dropped_ops_are_named_per_edge():
  before = np.zeros((14, 8), bool)
  before[:, [0, 1, 3]] = True  # none, max_pool_3x3, skip_connect
  after = before.copy()
  after[:, 0] = False
  after[13, 1] = False
  after[13, 0] = True
  text = G.describe_dropped(before, after)
  assert text.startswith('c_{k-2} \u2192 node 0: none; c_{k-1} \u2192 node 0: none;')
  assert text.endswith('node 2 \u2192 node 3: max_pool_3x3')
