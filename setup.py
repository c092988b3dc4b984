"""carvision: car make/model/submodel classification as a TFX pipeline (pip-installable)."""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def requirements():
  """Top-level requirements; requirements.lock pins the full set for reproducible builds."""
  with open(os.path.join(here, 'requirements.in')) as f:
    return [line.split('#')[0].strip() for line in f
            if line.split('#')[0].strip() and not line.startswith('pytest')]


setup(
    name='carvision',
    version='0.1.0',
    description='TFX pipeline: Postgres + photo host -> EfficientNet-Lite -> gated TFLite',
    packages=find_packages(include=['pipeline', 'pipeline.*', 'components', 'components.*']),
    package_data={'': ['*.yaml', '*.pbtxt']},
    data_files=[('carvision/configs', [os.path.join('configs', f) for f in os.listdir(os.path.join(here, 'configs'))]),
                ('carvision/schemas', ['schemas/schema.pbtxt'])],
    python_requires='>=3.10,<3.14',
    install_requires=requirements(),
    entry_points={'console_scripts': ['carvision = pipeline.cli:entry']},
)
