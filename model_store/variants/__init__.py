"""Variant builders, one module each, run in this order by model_store.pipeline.

The table maps a builder's name to its class; modules are imported when the builder runs, so
an optional dependency (TensorFlow for TFLite conversion) only matters to its own builder.
"""

from __future__ import annotations

BUILDERS: dict[str, str] = {
    "fp16": "model_store.variants.fp16:Fp16Builder",
    "int8-dynamic": "model_store.variants.quantize:DynamicInt8Builder",
    "int8-static": "model_store.variants.quantize:StaticInt8Builder",
    "prune": "model_store.variants.prune:PruneBuilder",
    "distill": "model_store.variants.distill:DistillBuilder",
    "width": "model_store.variants.width:WidthStudentBuilder",
    "tflite": "model_store.variants.tflite:TfliteBuilder",
    "rules": "model_store.variants.rules:RulesBuilder",
}
