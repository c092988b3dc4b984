"""Imports point down only: commands (pipeline.cli) -> pipeline -> components -> leaf modules.
A component never imports the pipeline layer, and one component's folder never imports
another's (what they share lives in a leaf module such as components/artifacts.py)."""
import ast
import os

from tests.helpers import REPO

NAMESPACE = 'carvision.'
COMPONENT_FOLDERS = ('example_gen', 'trainer', 'tflite_evaluator', 'pusher')


def _names(path):
  tree = ast.parse(open(path, encoding='utf-8').read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.module
      yield from (f'{node.module}.{a.name}' for a in node.names)


def _imports(path):
  """The project's imports of a file, without the `carvision.` namespace."""
  for name in _names(path):
    if name.startswith(NAMESPACE):
      yield name[len(NAMESPACE):]


def _modules(folder):
  for d, _, files in os.walk(os.path.join(REPO, folder)):
    for f in files:
      if f.endswith('.py') and 'third_party' not in d:
        yield os.path.join(d, f)


def test_components_never_import_the_pipeline_or_each_other():
  wrong = []
  for path in _modules('components'):
    rel = os.path.relpath(path, REPO)
    own = rel.split(os.sep)[1] if len(rel.split(os.sep)) > 2 else None
    for name in _imports(path):
      if name == 'pipeline' or name.startswith('pipeline.'):
        wrong.append(f'{rel} imports {name} (a layer up)')
      parts = name.split('.')
      if (len(parts) >= 2 and parts[0] == 'components' and parts[1] in COMPONENT_FOLDERS
          and parts[1] != own and own in COMPONENT_FOLDERS):
        wrong.append(f'{rel} imports {name} (another component)')
  assert not wrong, '\n'.join(wrong)


def test_the_pipeline_layer_never_imports_the_command_line():
  wrong = [f'{os.path.relpath(p, REPO)} imports {n}' for p in _modules('pipeline')
           if not p.endswith('cli.py') for n in _imports(p) if n in ('pipeline.cli',)
           or n.startswith('pipeline.cli.')]
  wrong += [f'{os.path.relpath(p, REPO)} imports {n}' for folder in ('components', 'bench')
            for p in _modules(folder) for n in _imports(p) if n.startswith('pipeline.cli')]
  assert not wrong, '\n'.join(wrong)


def test_no_module_imports_the_top_level_folders_outside_the_namespace():
  """`pipeline` and `components` are installed as carvision.pipeline / carvision.components:
  a plain `import pipeline...` works in a checkout only, and would load a second copy."""
  wrong = [f'{os.path.relpath(p, REPO)} imports {n}'
           for folder in ('pipeline', 'components', 'bench', 'tests', 'scripts')
           for p in _modules(folder) for n in _names(p)
           if n.split('.')[0] in ('pipeline', 'components')]
  assert not wrong, '\n'.join(wrong)
