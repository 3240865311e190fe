"""Entry point of the builder role (`appliance builder`): wires the loop and runs it."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from huggingface_hub.utils import disable_progress_bars
from redis import Redis

from appliance import bus
from appliance.db import open_engine
from appliance.install import install_id
from appliance.settings import Settings
from builder.apply import Applier
from builder.docker_engine import DockerEngine
from builder.gpu_agent import AgentGpuSource
from builder.hub_downloads import HubDownloads
from builder.loop import BuilderLoop
from builder.prepare import Preparer
from builder.pull import image_job
from builder.weights import weights_job
from gpu.inventory import GpuSource, load_gpu_source

logger = logging.getLogger(__name__)


def _gpu_source(
    settings: Settings, docker: DockerEngine, redis: Redis
) -> tuple[GpuSource, AgentGpuSource | None]:
    """The injected file where settings name one; in a container (compose), the GPU agent;
    on a host, NVML in this process."""
    if settings.gpu_agent_image and not settings.gpu_inventory_file:
        env = {
            "APPLIANCE_REDIS_URL": str(settings.redis_url),
            "APPLIANCE_LOG_LEVEL": "WARNING",
            "NVIDIA_DRIVER_CAPABILITIES": "utility",  # NVML is all the agent needs
        }
        # the agent writes to Redis, which the replicas' network (in compose) does not reach
        network = settings.gpu_agent_network or settings.replica_network
        agent = AgentGpuSource(docker, redis, settings.gpu_agent_image, env, network)
        return agent, agent
    gpu_file = str(settings.gpu_inventory_file) if settings.gpu_inventory_file else None
    return load_gpu_source(gpu_file), None


def main(settings: Settings) -> None:
    # downloads show as progress and events; huggingface_hub's progress bars and its HTTP
    # client's line per request would only fill the builder's log
    disable_progress_bars()
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    engine = open_engine(settings.database_path)
    redis = bus.connect(str(settings.redis_url))
    docker = DockerEngine(settings.docker_host, install_id(settings.data_dir))
    settings.hf_cache_path.mkdir(parents=True, exist_ok=True)  # replicas bind it
    # an earlier version kept the Hugging Face token in the cache every replica shares; a
    # replica that asks the hub now gets it in a file of its own container
    (settings.hf_cache_path / "token").unlink(missing_ok=True)
    applier = Applier(
        engine, docker, settings, on_routes_changed=lambda: bus.announce_routes(redis)
    )
    gpus, agent = _gpu_source(settings, docker, redis)
    preparer = Preparer(
        [
            lambda endpoint: image_job(endpoint, settings, docker),
            lambda endpoint: weights_job(endpoint, settings),
        ]
    )
    loop = BuilderLoop(
        engine,
        docker,
        applier,
        gpus,
        redis,
        settings.reconcile_interval_s,
        preparer=preparer,
        downloads=HubDownloads(settings, redis),
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping after this tick", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("builder started for install %s", docker.install_id)
    loop.run(stop)
    if agent is not None:
        agent.close()
    loop.images.close()
    docker.close()
