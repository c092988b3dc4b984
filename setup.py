"""carvision: car make/model/submodel classification as a TFX pipeline (pip-installable)."""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def requirements():
  """Top-level requirements; requirements.lock pins the full set for reproducible builds."""
  with open(os.path.join(here, 'requirements.in')) as f:
    return [line.split('#')[0].strip() for line in f
            if line.split('#')[0].strip() and not line.startswith('pytest')]


# `pip install carvision`: what `carvision predict` and `evaluate` need for a TFLite model
# (LiteRT, Pillow, NumPy; no TensorFlow), on the Pythons a phone team uses. The pipeline
# (TFX, Beam, TensorFlow: `pip install carvision[pipeline]`) is pinned in requirements.lock;
# tests/host/test_client_install.sh installs this set with the lock as constraints.
CLIENT = ['numpy>=1.24', 'pillow>=10.0', 'ai-edge-litert>=1.2', 'pydantic>=2.5',
          'pyyaml>=6.0', 'tqdm>=4.60']


setup(
    name='carvision',
    version='0.1.0',
    description='TFX pipeline: Postgres + photo host -> EfficientNet-Lite -> gated TFLite',
    # Installed under one namespace: the top-level folders become carvision.pipeline and
    # carvision.components (carvision/__init__.py finds them beside it in a checkout).
    packages=['carvision'] + [f'carvision.{p}' for p in find_packages(
        include=['pipeline', 'pipeline.*', 'components', 'components.*'])],
    package_dir={'carvision': 'carvision', 'carvision.pipeline': 'pipeline',
                 'carvision.components': 'components'},
    package_data={'': ['*.yaml', '*.pbtxt']},
    data_files=[('carvision/configs', [os.path.join('configs', f) for f in os.listdir(os.path.join(here, 'configs'))]),
                ('carvision/schemas', ['schemas/schema.pbtxt'])],
    python_requires='>=3.10',
    install_requires=CLIENT,
    extras_require={'pipeline': requirements(), 'report': ['matplotlib>=3.7']},
    entry_points={'console_scripts': ['carvision = carvision.pipeline.cli:entry']},
)
