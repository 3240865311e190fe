# The appliance's image: one image, one role per container (`appliance api|builder|worker|up`).
# BASE_IMAGE is any Debian-like image with python3 and venv. The first stage makes the wheels
# on BUILD_IMAGE (the same Python, and a C compiler, so that the data plane's hot modules are
# compiled: setup.py); a prepared wheelhouse in build/wheels (scripts/build-appliance-image)
# is used as it is, and then neither stage needs the network.
ARG BASE_IMAGE=python:3.12-slim
ARG BUILD_IMAGE=python:3.12

FROM ${BUILD_IMAGE} AS wheels
COPY . /src
RUN if ls /src/build/wheels/model_engine_appliance-*.whl >/dev/null 2>&1; then \
        cp -r /src/build/wheels /wheels; \
    else \
        python3 -m venv /build \
        && /build/bin/pip install --no-cache-dir 'mypy>=1.11' setuptools wheel /src \
        && /build/bin/pip wheel --no-cache-dir --no-build-isolation --wheel-dir /wheels /src; \
    fi

FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/appliance/bin:$PATH \
    APPLIANCE_DATA_DIR=/var/lib/appliance \
    APPLIANCE_MODELS_DIR=/models \
    APPLIANCE_HOST=0.0.0.0

COPY --from=wheels /wheels /wheels
RUN python3 -m venv /opt/appliance \
 && /opt/appliance/bin/pip install --no-cache-dir --no-index --find-links /wheels \
        model-engine-appliance \
 && rm -rf /wheels \
 && mkdir -p /var/lib/appliance /models

EXPOSE 8000
ENTRYPOINT ["appliance"]
CMD ["up"]
