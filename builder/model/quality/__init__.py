"""Quality of what an image serves, measured against the unquantized model it came from.

For each quantized GGUF (merged, or a base with LoRA GGUFs served unmerged): KL divergence, top-1
agreement and perplexity ratio against the f16/bf16 reference with llama.cpp's own
`llama-perplexity`, greedy answers to eval prompts compared token by token through `llama-server`
(for a vision-language model also to the eval prompts with images, text GGUF + mmproj: the report's
image part), decode speed, and the cost of measuring; optionally an importance matrix (`llama-imatrix`) from the
user's calibration data for `llama-quantize`.

API: `measure(reference, artifacts)` (the build stage: the artifacts it built), `compare_quants(
reference, quants, out_dir)` (`make quality`: several types side by side), `write_report`,
`print_report`, `check_threshold`. CLI: `python -m builder.model.quality --help`.
"""

from builder.model.quality.compare import compare_quants, imatrix_effect, quantized_artifacts, reference_gguf
from builder.model.quality.measure import Artifact, Settings, measure
from builder.model.quality.report import QualityEntry, check_threshold, print_report, read_report, summary, write_report
from builder.model.quality.tools import Served

__all__ = [
    "Artifact",
    "QualityEntry",
    "Served",
    "Settings",
    "check_threshold",
    "compare_quants",
    "imatrix_effect",
    "measure",
    "print_report",
    "quantized_artifacts",
    "read_report",
    "reference_gguf",
    "summary",
    "write_report",
]
