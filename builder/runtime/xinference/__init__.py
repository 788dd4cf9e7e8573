"""The Xinference image's entry point, `python -m builder.runtime.xinference` (`--health` for HEALTHCHECK).

It starts Xinference (xinference-local, or a cluster role's process: cluster.py), registers the model
folder (registration.py) and launches it, with Xinference's auth store seeded first (auth.py), then
stays in front as the container's main process (process.py). Standard library only, so builder's
dependencies stay small; Xinference itself runs from whatever environment holds `xinference-local`
($XINFERENCE_LOCAL, default: found on PATH). Settings: config.py and docs/serving.md
("Xinference runtime environment").
"""
