"""The supervision tree.

`root.serve` is the whole process under `ktulhu serve`: signals, the service tree, and hypercorn.
`tree.run` is the service tree alone (store -> services), which `ktulhu.asgi` runs from the ASGI
lifespan when hypercorn is started directly. Each service module exposes
`async def run(runtime, *, task_status)` and reports readiness with something useful.
"""
