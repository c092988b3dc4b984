"""carvision audit on the embedded sample with wrong labels put into its database: a real
PostgreSQL, a real photo host, the shipped TFLite model."""
import csv
import json
import os

from carvision.components import audit
from tests.helpers import TINY
from tests.test_cli import SHIPPED, _cli, _one_line_error
from tests.test_ingest import _edit_db, _pick_ads


def _class_of(labels_rows):
  return {int(r['ad_id']): '|'.join((r['make'], r['model'], r['submodel'])) for r in labels_rows}


def test_wrong_listings_rank_first_and_every_ad_is_listed(tmp_path, postgres, image_host,
                                                         tiny_labels, tiny_manifest):
  """Four ads get the make/model/submodel of another ad of another class (copied ids, so
  catalogued triples): they are the top four. Ads it cannot judge keep a reason."""
  truth = _class_of(tiny_labels)
  clean = [a for a, hashes in _pick_ads(tiny_labels, tiny_manifest, 200) if len(hashes) >= 2]
  wrong, donors, classes = [], {}, set()
  for a in clean:  # four ads of four classes, each given the labels of an ad left as it is
    if truth[a] in classes or a in donors.values():
      continue
    donor = next((d for d in clean if truth[d] != truth[a] and d not in wrong
                  and d not in donors.values() and d != a), None)
    if donor is None:
      continue
    wrong.append(a)
    donors[a] = donor
    classes.add(truth[a])
    if len(wrong) == 4:
      break
  assert len(wrong) == 4
  noise = tiny_manifest['noise_ids']
  edits = [('UPDATE app.ads a SET make_id = d.make_id, model_id = d.model_id, '
            'submodel_id = d.submodel_id FROM app.ads d WHERE a.id = %s AND d.id = %s', (a, donors[a]))
           for a in wrong]
  # one ad of a class the model does not know
  unknown = next(a for a in clean if a not in wrong and a not in donors.values())
  edits += [("INSERT INTO static.makes (id, name) VALUES (9101, 'Lada')", None),
            ("INSERT INTO static.models (id, make_id, name) VALUES (9101, 9101, 'Niva')", None),
            ('INSERT INTO static.models_submodels (model_id, submodel_id) SELECT 9101, submodel_id '
             'FROM app.ads WHERE id = %s', (unknown,)),
            ('UPDATE app.ads SET make_id = 9101, model_id = 9101 WHERE id = %s', (unknown,))]
  dsn = _edit_db(postgres, 'audit_noise', edits)
  out = tmp_path / 'audit.csv'
  res = _cli('audit', '--dsn', dsn, '--image-url-template', image_host.url_template,
             '--model', SHIPPED, '--output', str(out), '--json', str(tmp_path / 'audit.json'),
             '--quiet-progress')
  assert res.returncode == 0, res.stderr[-3000:]
  rows = list(csv.DictReader(open(out, encoding='utf-8')))
  assert {int(r['ad_id']) for r in rows[:4]} == set(wrong), [r['ad_id'] for r in rows[:8]]
  assert all(r['kind'] in (audit.OTHER_MAKE, audit.OTHER_MODEL, audit.OTHER_SUBMODEL)
             for r in rows[:4])
  said = ['|'.join((r['photos_say_make'], r['photos_say_model'], r['photos_say_submodel']))
          for r in rows[:4]]
  assert sum(c == truth[int(r['ad_id'])] for c, r in zip(said, rows)) >= 3  # the true class
  assert all(r['photos_say_make'] == truth[int(r['ad_id'])].split('|')[0] for r in rows[:4])
  # every ad with a photo row is listed once; judged first, by score; the rest with a reason
  ads = {int(r['ad_id']) for r in tiny_labels}
  assert sorted(int(r['ad_id']) for r in rows) == sorted(ads)
  scores = [float(r['score']) for r in rows if r['score']]
  assert scores == sorted(scores, reverse=True)
  unjudged = {int(r['ad_id']): r['reason'] for r in rows if not r['score']}
  assert list(unjudged) == [int(r['ad_id']) for r in rows[len(scores):]]
  assert unjudged[unknown].startswith('class unknown to the model')
  for a in noise['d_null_submodel_ads']:
    assert unjudged[int(a)].startswith('missing_label'), unjudged.get(int(a))
  for a in noise['d_unlinked_model_submodel_ads']:
    assert unjudged[int(a)].startswith('pair_not_in_catalog'), unjudged.get(int(a))
  assert all(reason for reason in unjudged.values())
  assert json.load(open(tmp_path / 'audit.json', encoding='utf-8'))[0]['ad_id'] == int(rows[0]['ad_id'])
  page = (tmp_path / 'audit.html').read_text(encoding='utf-8')
  assert page.count('<img src="data:image/jpeg;base64,') >= 8 and str(wrong[0]) in page
  assert f'audited {len(ads)} ads' in res.stdout


def test_audit_of_a_data_directory_and_of_an_empty_database(tmp_path, postgres):
  res = _cli('audit', '--data', TINY, '--split', 'test', '--output', str(tmp_path / 'a.csv'),
             '--quiet-progress')
  assert res.returncode == 0, res.stderr[-3000:]
  rows = list(csv.DictReader(open(tmp_path / 'a.csv', encoding='utf-8')))
  assert rows and all(r['kind'] or r['reason'] for r in rows)
  dsn = _edit_db(postgres, 'audit_empty', [('DELETE FROM app.ad_images', None),
                                           ('DELETE FROM app.ads', None)])
  _one_line_error(_cli('audit', '--dsn', dsn, '--output', str(tmp_path / 'b.csv')), 3,
                  'no ads to audit')
  assert not (tmp_path / 'b.csv').exists()
  _one_line_error(_cli('audit', '--csv', str(tmp_path / 'none-*.csv'), '--output',
                       str(tmp_path / 'c.csv')), 2, 'no file matches')
  _one_line_error(_cli('audit', '--model', str(tmp_path / 'no-model'), '--data', TINY), 2)
