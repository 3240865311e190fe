"""GPU inventory (from NVML or an injected file) and the placement policy; used by the builder
(which GPUs a replica gets) and the api (`GET /v1/gpus`)."""
