"""The one distribution namespace: `carvision.pipeline` and `carvision.components`.

Installed, setup.py maps the repository's `pipeline/` and `components/` folders inside this
package. In a checkout they stay at the top level (the project's layout), so this package
also looks there: `python -m carvision.pipeline.cli` works from the repository as it does
from an install, and nothing named plain `pipeline` or `components` is ever imported.
"""
import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if (not _os.path.isdir(_os.path.join(_here, 'pipeline'))
    and _os.path.isfile(_os.path.join(_root, 'pipeline', 'cli.py'))):
  __path__.append(_root)  # noqa: F821 (a package's own __path__)
