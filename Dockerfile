FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the wheel needs, so edits to tests/docs do not bust the install layer.
COPY pyproject.toml README.md ./
COPY coordinator ./coordinator
COPY workers ./workers
# The [api] extra brings the HTTP API (`coordinator serve`) and the MCP server.
RUN pip install ".[api]" \
    && useradd --create-home --uid 10001 app

USER app

CMD ["coordinator", "worker"]
