"""The image tier (runs on the host): render the Dockerfiles and compose.yaml, build, push."""
