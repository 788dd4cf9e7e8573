"""Build and serve fine-tuned LLMs as container images.

The pipeline, one module per stage: spec -> render -> merge -> convert -> build -> run -> push.
"""

__version__ = "0.1.0"
