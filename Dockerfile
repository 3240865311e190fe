# The appliance's image: one image, one role per container (`appliance api|builder|worker|up`).
# BASE_IMAGE is any Debian-like image with python3 and venv; a prepared wheelhouse in
# build/wheels (scripts/build-appliance-image) makes the build work with no network.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/appliance/bin:$PATH \
    APPLIANCE_DATA_DIR=/var/lib/appliance \
    APPLIANCE_MODELS_DIR=/models \
    APPLIANCE_HOST=0.0.0.0

COPY . /src
RUN python3 -m venv /opt/appliance \
 && if ls /src/build/wheels/model_engine_appliance-*.whl >/dev/null 2>&1; then \
        /opt/appliance/bin/pip install --no-cache-dir --no-index \
            --find-links /src/build/wheels model-engine-appliance; \
    else \
        /opt/appliance/bin/pip install --no-cache-dir /src; \
    fi \
 && rm -rf /src \
 && mkdir -p /var/lib/appliance /models

EXPOSE 8000
ENTRYPOINT ["appliance"]
CMD ["up"]
