"""The measurements ``scripts/benchmark.py`` prints: timing helpers, the GPU busy-share sampler, synthetic
benchmark data, and one module per benchmark (loss, models, evaluation, loader, training, demo, onnx).

Each benchmark returns its numbers; the script prints them. Nothing is imported here, so that importing one
benchmark does not import the others' dependencies (onnxruntime, the trainer).
"""
