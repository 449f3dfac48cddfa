"""GPTQ quantization: calibration data, GPTQ core, packing, streaming pipeline."""
